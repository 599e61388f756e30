"""`loram align`: continual pre-training of a pruned model on raw text (the paper's alignment).

Pruning removes channels the rest of the network was trained with; a short next-token
pre-training run on general text (the paper: FineWeb 0.5 + OpenWebMath 0.25 + 0.25) lets the
kept weights compensate. It is done once, by whoever publishes the pruned model; LoRA users
then train on the aligned model and recover into the *original* base as usual (the plan is
unchanged, so the adapter's plan id still matches).

    trained   every decoder-layer weight (attention, MLP, norms) and the final norm
    frozen    embed_tokens and lm_head (as the paper's code; --train-embeddings / --train-lm-head)
    budget    --steps, or --tokens T: steps = ceil(T / (seq_len * micro_batch * grad_accum * ranks))
    distill   --distill: the loss is KL(original || pruned) on the original's top-k next-token distribution
              (+ W x LM loss), the original run once beforehand and its top-k cached (loram.distill)
    sparse    (plan kind "sparse") M = (W != 0) for every decoder linear of the plan's layer range,
              taken at start from each rank's own part of W (after FSDP wrapped it); every optimizer
              step: grad <- grad * M before it, W <- W * M after it, so pruned zeros stay exactly 0

Output: a pruned model folder (same plan, ``extra["aligned"]`` records data, steps, tokens, lr),
loadable by ``loram.load_pruned``. Uses the same Trainer setup as `loram train` (loram.training.fit):
checkpoints, exact --resume, torchrun/accelerate, non-finite-loss and Ctrl-C handling.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .configs import AlignConfig, RunConfig
from .data import ListDataset, chunk_tokens, collate, examples_needed, mix, read_texts, streamed
from .errors import LoramError
from . import distill
from .io import atomic_dir, load_tokenizer, releases_locks, write_json
from .prune.sparse import sparse_mask_names
from .prune_plan import PrunePlan, has_plan
from .pruned_model import save_pruned
from .settings import check_config
from .training import TrainReport, claim_run, finish, fit, param_counts, run_precision, save_final
from .training.distributed import check_engine, gathered_state_dict, keep_zeros_callback


def steps_for_tokens(tokens: int, cfg: RunConfig, world: int) -> int:
    per_step = cfg.seq_len * cfg.micro_batch * cfg.grad_accum * world
    return max(1, math.ceil(tokens / per_step))


def set_trainable(model, train_embeddings: bool, train_lm_head: bool) -> None:
    """Everything trainable except the input embeddings and the output head (unless asked)."""
    for p in model.parameters():
        p.requires_grad_(True)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight  # one tensor: trained if either flag asks
    emb.weight.requires_grad_(train_embeddings or (tied and train_lm_head))
    if head is not None and not tied:
        head.weight.requires_grad_(train_lm_head)


def corpus_blocks(tok, cfg: AlignConfig) -> list:
    """The mixture's blocks. A streamed corpus (hub id, folder) is read only until it fills the blocks the run's
    --steps / --tokens draw; local files are read whole."""
    need = examples_needed(cfg)
    sources = [chunk_tokens(tok, read_texts(src), cfg.seq_len, name=f"corpus {src}", max_blocks=need if streamed(src) else None)
               for src in cfg.data]
    return mix(sources, cfg.data_weights, cfg.seed)


@releases_locks
def align(pruned: str | Path, out: str | Path, cfg: AlignConfig, resume: bool = False, overwrite: bool = False,
          checkpoint_dir: str | Path | None = None, callbacks: list | None = None) -> TrainReport:
    """Continual pre-training of a pruned model folder; writes an aligned pruned model folder."""
    from .loading import load_pruned_model  # looked up per call: tests swap it to prove errors come first

    check_config(cfg, "align")  # the CLI flags' ranges, for Python callers too, before any load
    device = run_precision(cfg)[0]  # --precision for this device (fp16 needs CUDA), before any load
    if not Path(pruned).is_dir() or not has_plan(pruned):
        raise LoramError(f"{pruned} is not a pruned model folder (no loram_plan.json): create one with `loram prune`")
    plan0 = PrunePlan.load(pruned)
    sparse = plan0.kind == "sparse"
    check_engine("align", sparse=sparse)
    teacher = distill.check_request(cfg, plan0, pruned)  # --distill: teacher, vocabulary, k, fingerprint; None without
    inputs, ckpt, settings = claim_run(cfg, pruned, out, overwrite, checkpoint_dir, resume)
    # tokenizer and corpus before the weights: a bad file fails in seconds
    tok = load_tokenizer(pruned)
    if cfg.tokens:  # before the corpus: a streamed corpus is read only as far as these steps need
        cfg.steps, cfg.epochs = steps_for_tokens(cfg.tokens, cfg, int(os.environ.get("WORLD_SIZE", "1"))), None
    blocks = corpus_blocks(tok, cfg)
    evals = {n: chunk_tokens(tok, read_texts(f), cfg.seq_len, name=f"--eval {n}") for n, f in cfg.eval.items()}
    dataset, collator, soft = ListDataset(blocks), collate(tok.pad_token_id), None
    if teacher is not None:  # the teacher's pass (or its cache) before the student loads: never both in memory
        blocks = distill.teacher_blocks(blocks, cfg)
        # the --eval blocks go through the same pass: their KL to the teacher is reported beside perplexity
        folder = distill.cache_folder(cfg.distill_cache, ckpt, resume, overwrite)
        cache, how = distill.ensure_cache(teacher, blocks, cfg, folder, device, evals)
        dataset, collator = distill.DistillDataset(blocks, cache), distill.collate(tok.pad_token_id)
        held = {n: distill.DistillDataset(ex, cache, n) for n, ex in evals.items()}
        soft = distill.DistillLoss(cfg.distill_temperature, cfg.distill_lm_weight, held)
    torch.manual_seed(cfg.seed)
    # fp32 weights whatever --precision: align trains them, and the optimizer needs fp32 master weights;
    # --precision sets the Trainer's autocast (training.fit)
    model, plan = load_pruned_model(pruned, dtype=torch.float32, device_map="auto")
    model.train()
    model.config.use_cache = False
    set_trainable(model, cfg.train_embeddings, cfg.train_lm_head)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the masks are taken once the engine has wrapped the model (its shards are what the optimizer sees)
    masks = list(sparse_mask_names(plan)) if sparse else []
    cbs = ([keep_zeros_callback(masks)] if masks else []) + list(callbacks or [])
    trainable, frozen = param_counts(model)
    r = fit(model, dataset, collator, cfg, ckpt, resume, overwrite, evals, tok.pad_token_id, cbs, settings, soft)
    report = TrainReport(str(out), r.steps, r.wall_s, r.tokens, r.tokens / max(r.wall_s, 1e-9), r.peak_rss_gb, r.peak_cuda_gb,
                         trainable, frozen, r.losses, {"total": 0}, r.eval_ppl, r.eval_history, r.resumed_from, eval_kl=r.eval_kl)
    state = gathered_state_dict(r.trainer)  # every rank: under FSDP / ZeRO-3 each holds only a part
    if r.trainer.args.process_index == 0:
        plan.extra = dict(plan.extra, aligned={
            "from": str(pruned), "data": list(cfg.data), "weights": cfg.data_weights, "steps": r.steps,
            "tokens_per_step": cfg.seq_len * cfg.micro_batch * cfg.grad_accum * r.trainer.args.world_size,
            "lr": cfg.lr, "seq_len": cfg.seq_len, "seed": cfg.seed, "final_loss": r.losses[-1]["loss"] if r.losses else None,
            "frozen": [n for n, on in (("embed_tokens", cfg.train_embeddings), ("lm_head", cfg.train_lm_head)) if not on],
            "sparse_masks": len(masks)} | ({"distill": distill.record(cfg, teacher, cache, how, r.eval_kl)} if teacher else {}))
        model.eval()
        def save():
            with atomic_dir(out, overwrite, "align", inputs) as tmp:
                save_pruned(model, tok, plan, tmp, state)
                write_json(Path(tmp) / "align_report.json", report.as_json())

        save_final(ckpt, save)
    finish(r.trainer)
    return report
