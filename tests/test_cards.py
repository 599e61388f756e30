"""Model cards (README.md with the Hub's front matter) on every folder loram writes, and --push-to-hub."""

import pytest
import yaml

from loram.card import CARD_MARK, PEFT_TEMPLATE, card_text, write_card
from loram.cli import main


def _front(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n") and CARD_MARK in text
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_dir, alpaca_file):
    from loram.prune import prune
    from loram.recover import recover
    from loram.train import TrainConfig, train

    d = tmp_path_factory.mktemp("cards")
    pruned = prune(str(tiny_dir), d / "P", method="magnitude", ratio=0.5, layers="1:5").out
    train(pruned, d / "A", TrainConfig(data=[str(alpaca_file)], steps=2, seq_len=64, rank=4, eval={"held": str(alpaca_file)}))
    recover(d / "A", tiny_dir, d / "R")
    return d


def test_pruned_folder_card(chain):
    front, text = _front(chain / "P")
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"loram", "pruned", "loram-structured"} <= set(front["tags"])
    assert "Prune plan: structured / magnitude, layers [1, 5]" in text and "parameters" in text


def test_adapter_cards(chain):
    front, text = _front(chain / "A")
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    assert "stage: pruned" in text and "loram recover" in text  # says it fits the pruned model only
    assert "Measured: 2 steps" in text and "held-out perplexity held" in text
    assert PEFT_TEMPLATE not in text  # PEFT's placeholder card was replaced
    front, text = _front(chain / "R")
    assert front["library_name"] == "peft" and "stage: recovered" in text


def test_base_model_only_for_hub_ids(tmp_path):
    import json

    (tmp_path / "loram_plan.json").write_text(json.dumps({"kind": "structured", "method": "taylor", "layers": [4, 28],
                                                          "mlp_ratio": 0.5, "attn_ratio": 0.5,
                                                          "base": {"name": "meta-llama/Llama-2-13b-hf"}}))
    front = yaml.safe_load(card_text(tmp_path, "prune").split("---\n")[1])
    assert front["base_model"] == "meta-llama/Llama-2-13b-hf"
    (tmp_path / "loram_plan.json").write_text(json.dumps({"kind": "structured", "base": {"name": str(tmp_path)}}))
    assert "base_model" not in yaml.safe_load(card_text(tmp_path, "prune").split("---\n")[1])  # a local path is not one


def test_foreign_card_kept(tmp_path):
    (tmp_path / "README.md").write_text("my own card")
    write_card(tmp_path, "merge")
    assert (tmp_path / "README.md").read_text() == "my own card"


def test_push_offline_one_line_before_work(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "random", "--push-to-hub", "me/x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "switched off" in err and "\n" not in err and not (tmp_path / "P").exists()


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "../x", "me/x.git"])
def test_push_bad_repo_id(tmp_path, tiny_dir, capsys, repo):
    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "random", "--push-to-hub", repo]) == 2
    assert "is not a hub repo id" in capsys.readouterr().err and not (tmp_path / "P").exists()


def test_push_uploads_the_written_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            from pathlib import Path

            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "random", "--push-to-hub", "me/tiny-pruned"]) == 0
    assert calls[0] == ("create", "me/tiny-pruned", True)
    assert calls[1][0] == "upload" and {"README.md", "loram_plan.json", "config.json"} <= set(calls[1][2])
    assert "pushed" in capsys.readouterr().out


def test_push_failure_keeps_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    import huggingface_hub

    class Down:
        def create_repo(self, *a, **k):
            raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Down)
    assert main(["prune", str(tiny_dir), "-o", str(tmp_path / "P"), "--method", "random", "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "could not push" in err and "hf upload me/x" in err and (tmp_path / "P" / "loram_plan.json").exists()
