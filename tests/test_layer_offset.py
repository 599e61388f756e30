"""`loram train --original-offset --offset-at layers`: each decoder layer of the pruned model is corrected to the
original's output on the original's input. With the adapter at its start (B = 0) the pruned model then computes the
ORIGINAL's logits exactly (padding and collator included); the corrections are the same read one original layer at a
time; they are cached and reused; the original is gone before training; the adapter recovers as any other."""

import json

import pytest
import torch

from loram import layer_offset, offset
from loram.cli import main
from loram.errors import LoramError
from loram.eval import runner
from loram.prune_plan import PrunePlan
from loram.testing import teacher_watch
from loram.train import train
from test_align import make_sparse, pruned_dir  # noqa: F401  (fixtures shared with the align tests)
from test_offset import ocfg, rows_file


def setup(tiny_dir, pruned_dir, tmp_path, **kw):
    from loram.data import build_dataset
    from loram.io import load_tokenizer
    from loram.loading import load_pruned_model

    cfg = ocfg(rows_file(tmp_path), offset_at="layers", offset_top_k=32, **kw)
    teacher = offset.check_request(cfg, PrunePlan.load(pruned_dir), pruned_dir)
    tok = load_tokenizer(pruned_dir)
    examples = offset.run_examples(build_dataset(tok, cfg)[0].examples, cfg)
    return cfg, teacher, tok, examples, load_pruned_model(pruned_dir)[0]


def test_corrected_pruned_model_computes_the_originals_logits(tiny_dir, pruned_dir, tmp_path):
    from peft import get_peft_model

    from loram.loading import load_model
    from loram.train import lora_config

    cfg, teacher, tok, examples, student = setup(tiny_dir, pruned_dir, tmp_path)
    sid = layer_offset.student_id(pruned_dir, None)
    data, rec = layer_offset.prepare(teacher, student, sid, examples, tmp_path / "c")
    assert rec["examples"] == 6 and rec["computed"] and len(rec["mean_abs_per_layer"]) == student.config.num_hidden_layers
    batch = layer_offset.collate(tok.pad_token_id)([data[j] for j in (0, 3, 5)])  # different lengths: padded
    pm = get_peft_model(student, lora_config(cfg)).eval()
    layer_offset.attach(pm)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        got = pm(**inputs, layer_offset=batch["layer_offset"]).logits
        plain = pm(**inputs).logits  # without the keyword the hooks add nothing: the pruned model as it is
        want = load_model(tiny_dir).eval()(**inputs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    assert (plain[real] - want[real]).abs().max() > 1e-2  # the pruned model alone computes otherwise
    # the same examples, original and pruned weights: the cache is read back, not recomputed
    again, rec2 = layer_offset.prepare(teacher, student, sid, examples, tmp_path / "c")
    assert not rec2["computed"] and torch.equal(again[4]["layer_offset"], data[4]["layer_offset"])


def test_streamed_original_gives_the_same_corrections(tiny_dir, pruned_dir, tmp_path, monkeypatch):
    """An original that does not fit is read one decoder layer at a time (loram.stream): same numbers."""
    _, teacher, _, examples, student = setup(tiny_dir, pruned_dir, tmp_path)
    sid = layer_offset.student_id(pruned_dir, None)
    whole, rec = layer_offset.prepare(teacher, student, sid, examples, tmp_path / "a")
    monkeypatch.setattr(runner, "scoring_plan", lambda *a, **kw: (True, 1 << 20))
    streamed, rec2 = layer_offset.prepare(teacher, student, sid, examples, tmp_path / "b")
    assert rec2["streamed"] and not rec["streamed"]
    for j in range(len(examples)):
        torch.testing.assert_close(streamed[j]["layer_offset"], whole[j]["layer_offset"], rtol=1e-4, atol=1e-5)


def test_train_end_to_end_and_recover(tiny_dir, pruned_dir, tmp_path):
    watch, seen = teacher_watch()
    cfg = ocfg(rows_file(tmp_path), steps=4, offset_at="layers", offset_top_k=32, offset_cache=str(tmp_path / "c"))
    r = train(pruned_dir, tmp_path / "ad", cfg, callbacks=[watch])
    assert r.steps == 4 and seen == [0] * 4 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r.losses)
    meta = json.loads((tmp_path / "ad" / "loram_adapter.json").read_text())
    assert meta["original_offset"]["at"] == "layers" and meta["original_offset"]["computed"]
    assert meta["train"]["offset_at"] == "layers"
    assert main(["recover", str(tmp_path / "ad"), "--base", str(tiny_dir), "-o", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kw, msg", [
    (dict(original_offset=False, offset_top_k=32), "--offset-at only applies with --original-offset"),
    (dict(offset_top_k=8), "--offset-at layers needs none: drop --offset-top-k"),
])
def test_wrong_requests_fail_before_anything_loads(tmp_path, pruned_dir, kw, msg):
    with pytest.raises(LoramError, match=msg):
        train(pruned_dir, tmp_path / "ad", ocfg(rows_file(tmp_path), offset_at="layers", **kw))
    assert not (tmp_path / "ad").exists()


def test_gradient_checkpointing_replays_the_corrections(tiny_dir, pruned_dir, tmp_path):
    """Under gradient checkpointing the layers run again in the backward pass: the keyword travels with them, so the
    LoRA gradients are the same as without checkpointing (and differ from training without the corrections)."""
    from peft import get_peft_model

    from loram.train import lora_config

    cfg, teacher, tok, examples, student = setup(tiny_dir, pruned_dir, tmp_path, dropout=0.0)  # the same graph twice
    data, _ = layer_offset.prepare(teacher, student, layer_offset.student_id(pruned_dir, None), examples, tmp_path / "c")
    batch = layer_offset.collate(tok.pad_token_id)([data[j] for j in (0, 1, 2)])
    torch.manual_seed(0)
    pm = get_peft_model(student, lora_config(cfg))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would leave lora_A without gradient
    layer_offset.attach(pm)

    def grads(checkpointing: bool, corrected: bool = True):
        if checkpointing:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            pm.base_model.model.enable_input_require_grads()
        pm.train()
        pm.zero_grad()
        kw = {"layer_offset": batch["layer_offset"]} if corrected else {}
        pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], **kw).loss.backward()
        return torch.cat([p.grad.flatten() for n, p in pm.named_parameters() if p.requires_grad])

    plain_run, no_offset = grads(False), grads(False, corrected=False)
    torch.testing.assert_close(grads(True), plain_run, rtol=1e-4, atol=1e-6)
    assert (no_offset - plain_run).abs().max() > 1e-4
