"""`loram train`: LoRA (or QLoRA) on a pruned model folder or an ordinary HF model.

Memory of LoRA training (why LoRAM prunes the base first):

    frozen base weights  P_base * bytes      <- dominant for large models; LoRAM shrinks P_base,
                                                NF4 (QLoRAM) shrinks the bytes to ~0.5
    LoRA params+grads+AdamW   16 B * r * sum(in + out) over targets   (tiny)
    activations          ~ batch * seq * layers * widths (checkpointing keeps one layer's)

The adapter folder written here carries the plan and the base fingerprint, so `loram recover`
needs nothing else. The Trainer loop, checkpoints and --resume are loram.training's (shared with
`loram align`); the data mixture is loram.data's; --eval perplexity is loram.eval.ppl's.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from . import anchor as anchors
from . import distill, layer_offset, offset
from .adapter import ADAPTER_META, STAGE_PRUNED, warn_lm_head_serving, write_adapter
from .configs import DEFAULT_TARGETS, TARGET_MODULES, TrainConfig  # noqa: F401  (the LoRA stage's names)
from .data import build_dataset, eval_sets, read_chat_template, skip_summary
from .device import default_device
from .errors import LoramError
from .fingerprint import base_fingerprint
from .io import atomic_dir, load_tokenizer, releases_locks, write_json
from .loading import load_model, load_original_nf4, load_pruned_model, pruned_folder, safetensors_folder
from .nf4 import quantize_nf4, store_rest_in
from .prune_plan import PrunePlan, has_plan
from .settings import check_config
from .training import TrainReport, claim_run, finish, fit, is_main, param_counts, run_precision, save_final
from .training.distributed import check_engine, gathered_state_dict


# ---- model and LoRA ---------------------------------------------------------------------------
def load_base(model: str | Path, quantize: str | None, dtype=torch.float32, device=None):
    """(model, plan or None, base fingerprint) for a pruned folder or an ordinary model (the tokenizer is
    loaded first, by train), on ``device`` (default: cuda:LOCAL_RANK or cpu) with its weights in ``dtype``,
    the compute dtype; with NF4, quantised layer by layer there and everything else stored in ``dtype``."""
    device = default_device() if device is None else torch.device(device)
    if quantize not in (None, "nf4"):
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    if Path(str(model)).is_dir() and has_plan(model):
        m, plan = load_pruned_model(model, quantize=quantize, dtype=dtype, device_map=str(device))
        return m, plan, plan.base["fingerprint"]
    if quantize == "nf4" and safetensors_folder(model) is not None:  # fingerprinted from its files
        return load_original_nf4(model, dtype, device), None, base_fingerprint(model)
    m = load_model(model, dtype=torch.float32 if quantize else dtype)  # a .gguf or hub id: whole, then NF4
    # fingerprint the original now: after NF4 or PEFT wrapping the state dict no longer shows its weights
    fp = base_fingerprint(model, m)
    if quantize == "nf4":
        store_rest_in(quantize_nf4(m, dtype, device=device), dtype)  # each linear quantised on the device
    m.to(device)  # cuda:LOCAL_RANK, not GPU 0 for every rank
    return m, None, fp


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    bad = [t for t in cfg.targets if t not in TARGET_MODULES]
    if bad or not cfg.targets:
        raise LoramError(f"unknown --targets {bad}: choose from {', '.join(TARGET_MODULES)}")
    if cfg.rank < 1:
        raise LoramError(f"--rank {cfg.rank} must be >= 1: e.g. 8")
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=[TARGET_MODULES[t] for t in cfg.targets], task_type="CAUSAL_LM")


# ---- loram train -------------------------------------------------------------------------------
@releases_locks
def train(model_name: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          checkpoint_dir: str | Path | None = None, callbacks: list | None = None) -> TrainReport:
    from peft import get_peft_model

    from .data import collate  # looked up per call: tests/test_ddp.py swaps it to record each rank's batches

    check_config(cfg, "train")  # the CLI flags' ranges, for Python callers too, before any load
    device, dtype = run_precision(cfg)  # --precision for this device (fp16 needs CUDA), before any load
    check_engine("train", quantize=cfg.quantize)
    template = read_chat_template(cfg.chat_template) if cfg.chat_template else None  # a missing or broken file: now
    inputs, ckpt, settings = claim_run(cfg, model_name, out, overwrite, checkpoint_dir, resume)
    # a pruned base named by its hub id (its repo holds loram_plan.json) is read from its snapshot folder exactly
    # as a local pruned folder; the adapter still records ``model_name``. Here only its plan is downloaded
    # (a repo that cannot be had fails now), its weights after the tokenizer and data checks.
    pruned = pruned_folder(model_name, fetch=False)
    # --original-offset: checked from the plan (``pruned`` holds it, a hub repo's weights are not fetched yet) and configs
    teacher = offset.check_request(cfg, PrunePlan.load(pruned) if pruned and cfg.original_offset else None, model_name)
    anchors.check_request(cfg)
    if is_main():
        warn_lm_head_serving(cfg.targets, f"`loram recover {out} --base ORIGINAL -o R`, then `loram merge ORIGINAL R -o MERGED`"
                             if pruned else f"`loram merge {model_name} {out} -o MERGED`")
    # tokenizer and data before the weights: a bad file, row or chat template fails in seconds
    tok = load_tokenizer(model_name)
    if template is not None:
        tok.chat_template = template
    dataset, dropped = build_dataset(tok, cfg)
    evals, eval_dropped = eval_sets(tok, cfg)
    anchor = anchors.load(tok, cfg)  # --anchor's corpus, tokenized before the weights load (a bad file fails now)
    if is_main():
        for what, skipped in [("--data", dropped)] + [(f"--eval {n}", d) for n, d in eval_dropped.items()]:
            if skipped["total"] or skipped.get("truncated"):
                print(f"{what}: {skip_summary(skipped)}", flush=True)
    soft = offset_record = None
    by_layer = teacher is not None and cfg.offset_at == "layers"
    if teacher is not None:  # the rows the run trains on, and where the original's pass is cached
        cache_dir = distill.cache_folder(cfg.offset_cache, ckpt, resume, overwrite)
        examples = offset.run_examples(dataset.examples, cfg)
    if by_layer:  # loram.layer_offset: the corrections need the student's layers, computed once it is loaded
        collator = layer_offset.collate(tok.pad_token_id)
    elif teacher is not None:  # the original's pass (or its cache) before the student loads: never both in memory
        dataset, collator, soft, offset_record = offset.prepare(teacher, examples, cfg, tok.pad_token_id, cache_dir, device)
    else:
        collator = collate(tok.pad_token_id)
    source = pruned_folder(model_name) if pruned else model_name
    torch.manual_seed(cfg.seed)
    model, plan, base_fp = load_base(source, cfg.quantize, dtype, device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    if by_layer:  # the original's pass (or its cache) against the student's layers, the original released after it
        dataset, offset_record = layer_offset.prepare(teacher, model, layer_offset.student_id(source, cfg.quantize), examples,
                                                      cache_dir, device, dtype, cfg.max_memory)
    pm = get_peft_model(model, lora_config(cfg))
    if by_layer:
        layer_offset.attach(pm)
    trainable, frozen = param_counts(pm)
    r = fit(pm, dataset, collator, cfg, ckpt, resume, overwrite, evals, tok.pad_token_id, callbacks, settings, soft, anchor)
    report = TrainReport(str(out), r.steps, r.wall_s, r.tokens, r.tokens / max(r.wall_s, 1e-9), r.peak_rss_gb, r.peak_cuda_gb,
                         trainable, frozen, r.losses, dropped, r.eval_ppl, r.eval_history, r.resumed_from, eval_dropped)
    state = gathered_state_dict(r.trainer, trainable_only=True)  # every rank: under FSDP / ZeRO-3 each holds only a part
    if r.trainer.args.process_index == 0:
        records = {"original_offset": offset_record, "anchor": anchor.record() if anchor else None}
        save_final(ckpt, lambda: save_adapter(pm, out, model_name, plan, cfg, report, overwrite, inputs, base_fp, state,
                                              records))
    finish(r.trainer)
    return report


def save_adapter(pm, out, model_name, plan, cfg: TrainConfig, report: TrainReport, overwrite: bool, inputs=(),
                 base_fp: dict | None = None, state: dict | None = None, records: dict | None = None) -> None:
    """``records``: what --original-offset / --anchor used (offset.prepare's record, Anchor.record), kept in
    loram_adapter.json under their names (None: not used).
    ``base_fp``: the original's fingerprint taken at load time (load_base), for an adapter of an original.
    ``state``: the trained weights gathered from every rank (training.distributed.gathered_state_dict);
    None: the model's own (one process)."""
    from peft import get_peft_model_state_dict

    lora = get_peft_model_state_dict(pm, state_dict=state, save_embedding_layers=False)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in lora.items()}
    lcfg = pm.peft_config["default"].to_dict()
    lcfg["base_model_name_or_path"] = str(model_name)
    lcfg = json.loads(json.dumps(lcfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    if plan is not None:
        meta = {"stage": STAGE_PRUNED, "plan_id": plan.id, "base_fingerprint": plan.base["fingerprint"],
                "base_name": plan.base.get("name"), "trained_on": str(model_name)}
    else:
        meta = {"stage": "original", "base_fingerprint": base_fp or base_fingerprint(model_name),
                "base_name": str(model_name)}
    meta["train"] = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    meta |= {k: v for k, v in (records or {}).items() if v}
    with atomic_dir(out, overwrite, "train", inputs) as tmp:
        write_adapter(tmp, sd, lcfg, meta, plan)
        write_json(Path(tmp) / "train_report.json", report.as_json())
    assert (Path(out) / ADAPTER_META).exists()
