"""`loram train`: LoRA and QLoRA on pruned tiny models, eval sets, exact resume, non-finite loss, Ctrl-C."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loram.adapter import read_meta
from loram.errors import LoramError
from loram.prune_plan import PrunePlan
from loram.train import TrainConfig, train
from loram.training import TrainingInterrupted, complete_checkpoints


@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory):
    from loram.prune import prune

    out = tmp_path_factory.mktemp("pr") / "pruned"
    prune(str(tiny_dir), out, method="magnitude", ratio=0.5)
    return out


def cfg(data, **kw):
    base = dict(data=[str(data)], steps=4, lr=1e-2, micro_batch=2, logging_steps=1, seq_len=64)
    return TrainConfig(**(base | kw))


def test_train_on_pruned_model_with_eval_sets(pruned_dir, alpaca_file, tmp_path):
    r = train(pruned_dir, tmp_path / "A", cfg(alpaca_file, eval={"in": f"{alpaca_file}[:8]", "out": f"{alpaca_file}[-8:]"},
                                              targets=("q", "k", "v", "o", "gate", "up", "down", "lm_head")))
    assert r.steps == 4 and len(r.losses) == 4 and all(math.isfinite(x["loss"]) for x in r.losses)
    assert set(r.eval_ppl) == {"in", "out"} and all(1 < v < 1e4 for v in r.eval_ppl.values())
    assert r.tokens > 0 and r.tokens_per_s > 0 and r.peak_rss_gb > 0 and r.trainable_params > 0 and r.frozen_params > 0
    assert "tokens/s" in r.summary() and "ppl in" in r.summary()
    meta = read_meta(tmp_path / "A")
    assert meta["stage"] == "pruned" and meta["plan_id"] == PrunePlan.load(pruned_dir).id
    keys = load_file(str(tmp_path / "A" / "adapter_model.safetensors"))
    assert any("lm_head.lora_A" in k for k in keys)
    assert json.loads((tmp_path / "A" / "train_report.json").read_text())["eval_ppl"].keys() == {"in", "out"}


def test_qloram_nf4_on_pruned_model(pruned_dir, alpaca_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    r = train(pruned_dir, tmp_path / "Q", cfg(alpaca_file, steps=2, quantize="nf4"))
    assert r.steps == 2 and all(math.isfinite(x["loss"]) for x in r.losses)
    t = load_file(str(tmp_path / "Q" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in t.values())
    assert any(v.abs().sum() > 0 for k, v in t.items() if "lora_B" in k)  # the adapter learned something


def test_resume_is_exact(tiny_dir, tmp_path):
    """Stop after 3 steps (keep only that checkpoint), resume: same losses and adapter as one run.
    grad-accum 2 and a 6-row set make the run cross epoch boundaries."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"add {i} {i}", "output": str(2 * i)}) for i in range(6)))
    c = cfg(data, steps=7, save_steps=3, grad_accum=2, dropout=0.1, eval={"x": str(data)})
    full = train(tiny_dir, tmp_path / "full", c)
    shutil.copytree(tmp_path / "full-checkpoints" / "checkpoint-3", tmp_path / "part-checkpoints" / "checkpoint-3")
    part = train(tiny_dir, tmp_path / "part", c, resume=True)
    assert part.resumed_from.endswith("checkpoint-3")
    la, lb = [x["loss"] for x in full.losses], [x["loss"] for x in part.losses]
    assert len(la) == len(lb) == 7 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-5
    A, B = load_file(str(tmp_path / "full" / "adapter_model.safetensors")), load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert A.keys() == B.keys() and max((A[k] - B[k]).abs().max().item() for k in A) < 1e-5
    assert abs(full.eval_ppl["x"] - part.eval_ppl["x"]) < 1e-4


def test_resume_needs_checkpoints_and_fresh_run_refuses_old_ones(tiny_dir, alpaca_file, tmp_path):
    with pytest.raises(LoramError, match="no complete checkpoint"):
        train(tiny_dir, tmp_path / "A", cfg(alpaca_file), resume=True)
    (tmp_path / "A-checkpoints" / "checkpoint-2").mkdir(parents=True)  # half-written: no marker
    with pytest.raises(LoramError, match="--resume to continue it or --overwrite"):
        train(tiny_dir, tmp_path / "A", cfg(alpaca_file))
    with pytest.raises(LoramError, match="no complete checkpoint"):
        train(tiny_dir, tmp_path / "A", cfg(alpaca_file), resume=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_dir, alpaca_file, tmp_path, monkeypatch):
    from transformers import Trainer

    real = Trainer.compute_loss

    def poisoned(self, model, inputs, *a, **kw):
        loss = real(self, model, inputs, *a, **kw)
        return loss * float("nan") if self.state.global_step >= 4 else loss

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    with pytest.raises(LoramError, match=r"non-finite at step 5.*checkpoint-4 kept"):
        train(tiny_dir, tmp_path / "A", cfg(alpaca_file, steps=8, save_steps=2))
    assert [p.name for p in complete_checkpoints(tmp_path / "A-checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "A").exists()


def test_ctrl_c_stops_cleanly_with_checkpoint_kept(tiny_dir, alpaca_file, tmp_path):
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match=r"at step 3: checkpoint .*checkpoint-2 kept, continue with --resume"):
        train(tiny_dir, tmp_path / "A", cfg(alpaca_file, steps=6, save_steps=2), callbacks=[CtrlC()])
    assert not (tmp_path / "A").exists()
    r = train(tiny_dir, tmp_path / "A", cfg(alpaca_file, steps=6, save_steps=2), resume=True)
    assert r.steps == 6 and (tmp_path / "A").is_dir()


def test_cli_ctrl_c_is_one_line_and_exit_130(tiny_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    import loram.train
    from loram.cli import main

    def interrupted(*a, **kw):
        raise TrainingInterrupted("interrupted (Ctrl-C) at step 3: checkpoint X kept, continue with --resume")

    monkeypatch.setattr(loram.train, "train", interrupted)
    assert main(["train", str(tiny_dir), "--data", str(alpaca_file), "-o", str(tmp_path / "A")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: interrupted (Ctrl-C) at step 3: checkpoint X kept, continue with --resume"]


def test_bad_knobs_fail_clearly(tiny_dir, alpaca_file, tmp_path):
    with pytest.raises(LoramError, match="unknown --targets"):
        train(tiny_dir, tmp_path / "A", cfg(alpaca_file, targets=("qq",)))
    with pytest.raises(LoramError, match="unknown schedule"):
        train(tiny_dir, tmp_path / "B", cfg(alpaca_file, schedule="zigzag"))
    with pytest.raises(LoramError, match="longer than --seq-len 4"):
        train(tiny_dir, tmp_path / "C", cfg(alpaca_file, seq_len=4))


@pytest.mark.parametrize("extra", [dict(grad_accum=2), dict(grad_checkpointing=True, targets=("q", "v", "down", "lm_head"))])
def test_loss_chunk_trains_exactly_like_the_stock_loss(pruned_dir, alpaca_file, tmp_path, extra):
    """--loss-chunk changes memory, not the run: same losses, same adapter (grad accumulation normalises
    by the accumulated batch's targets in both; lm_head may itself carry LoRA)."""
    c = dict(steps=3, dropout=0.0) | extra
    ref = train(pruned_dir, tmp_path / "stock", cfg(alpaca_file, **c))
    got = train(pruned_dir, tmp_path / "chunk", cfg(alpaca_file, loss_chunk=7, **c))
    la, lb = [x["loss"] for x in ref.losses], [x["loss"] for x in got.losses]
    assert len(la) == len(lb) == 3 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-4
    A = load_file(str(tmp_path / "stock" / "adapter_model.safetensors"))
    B = load_file(str(tmp_path / "chunk" / "adapter_model.safetensors"))
    assert A.keys() == B.keys() and max((A[k] - B[k]).abs().max().item() for k in A) < 1e-4
    assert any("lora_B" in k and A[k].abs().sum() > 0 for k in A)  # it trained: the comparison is not of zeros
    with pytest.raises(LoramError, match=r"--loss-chunk -1 is out of range: use an integer >= 0 \(0: off\)"):
        train(pruned_dir, tmp_path / "bad", cfg(alpaca_file, loss_chunk=-1))


def test_skipped_rows_counted_in_report_and_summary(tiny_dir, alpaca_file, tmp_path, capsys):
    """Rows with an unknown role or too long are not trained on: the report and the printed summary count them by reason."""
    from loram.cli import main

    rows = [json.loads(x) for x in alpaca_file.read_text().splitlines()][:10]
    rows += [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}] * 2
    rows += [{"instruction": "q" * 100, "output": "a"}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps(r) for r in rows[:3] + rows[-1:]))
    assert main(["train", str(tiny_dir), "--data", str(data), "--eval", f"held={held}", "-o", str(tmp_path / "A"),
                 "--steps", "1", "--seq-len", "64"]) == 0
    rep = json.loads((tmp_path / "A" / "train_report.json").read_text())
    assert rep["dropped"] == {"unknown_role": 2, "too_long": 1, "total": 3}
    assert rep["eval_dropped"] == {"held": {"too_long": 1, "total": 1}}
    out = capsys.readouterr().out
    assert "--data: 3 rows skipped (2 unknown_role, 1 too_long)" in out and "--eval held: 1 row skipped (1 too_long)" in out
    assert out.strip().splitlines()[-1].endswith("; 3 rows skipped (2 unknown_role, 1 too_long)")
