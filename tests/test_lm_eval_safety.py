"""lm-eval tasks that execute generated code (unsafe_code: humaneval, mbpp, ...) run only with
--allow-code-execution; without it `loram eval` stops with one line before the model loads.

lm-eval's registry is read offline: its index parses the task YAMLs, no dataset is fetched."""

import json
import random

import pytest

from loram.cli import main
from loram.errors import LoramError
from loram.testing import tiny_model, tiny_tokenizer
from test_errors import fails, no_weights  # noqa: F401  (no_weights: loading a model fails the test)

pytest.importorskip("lm_eval")


def mc_task(folder, name: str, unsafe: bool):
    """A local multiple-choice task (offline) tagged loram_tag; ``unsafe`` marks it as lm-eval marks code tasks."""
    rng = random.Random(0)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"query": f"Item {i}?", "choices": ["red", "blue"], "gold": rng.randrange(2)}) + "\n"
                            for i in range(4)))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ntag: loram_tag\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"{'unsafe_code: true' + chr(10) if unsafe else ''}test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\nmetric_list:\n  - metric: acc\n")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    mc_task(d, "loram_safe", unsafe=False)
    mc_task(d, "loram_unsafe", unsafe=True)
    (d / "group.yaml").write_text("group: loram_group\ntask:\n  - loram_safe\n  - loram_unsafe\n")
    return d


def test_unsafe_tasks_are_found_from_their_configs(tasks):
    from loram.eval.harness import unsafe_tasks

    # lm-eval's own code tasks, a task that includes one (humaneval_64 includes humaneval.yaml), a local group
    assert unsafe_tasks(["humaneval", "mbpp", "humaneval_64", "arc_easy"]) == ["humaneval", "mbpp", "humaneval_64"]
    # a tag holding an unsafe task is unsafe; a safe task sharing that tag is not
    assert unsafe_tasks(["loram_safe", "loram_unsafe", "loram_group", "loram_tag"], str(tasks)) == [
        "loram_unsafe", "loram_group", "loram_tag"]


@pytest.mark.parametrize("task", ["humaneval", "loram_group"])
def test_eval_refuses_code_tasks_without_the_flag(task, tasks, tiny_dir, capsys, no_weights):
    msg = fails(capsys, "eval", tiny_dir, "--lm-eval", task, "--lm-eval-include", tasks,
                expect=f"lm-eval task(s) ['{task}'] execute the model's generated code")
    assert "pass --allow-code-execution" in msg


def test_allow_code_execution_runs_an_unsafe_task(tasks):
    from loram.eval.harness import lm_eval_tasks

    model, tok = tiny_model("llama-gqa", seed=3), tiny_tokenizer()
    with pytest.raises(LoramError, match="--allow-code-execution"):  # the Python API refuses too
        lm_eval_tasks(model, tok, ["loram_unsafe"], include=str(tasks))
    res = lm_eval_tasks(model, tok, ["loram_unsafe"], include=str(tasks), batch_size=4, allow_code_execution=True)
    assert res["loram_unsafe"]["acc"][1] == 4 and 0 <= res["loram_unsafe"]["acc"][0] <= 1


def test_eval_cli_passes_the_flag(tasks, tiny_dir, capsys):
    assert main(["eval", str(tiny_dir), "--lm-eval", "loram_unsafe", "--lm-eval-include", str(tasks), "--allow-code-execution",
                 "--json", "--batch-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["metric"], r["n"]) for r in out["results"]] == [("loram_unsafe", "acc", 4)]
