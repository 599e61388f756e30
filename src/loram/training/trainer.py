"""``fit``: the one Trainer setup shared by `loram train` (LoRA) and `loram align` (continual pre-training).

The Trainer subclass stops on a non-finite loss (every rank at once), checkpoints only finite
weights, marks complete checkpoints (checkpoint.py), keeps optimizer / scheduler / RNG state
pickle-free (state.py) and can compute the loss in chunks (loram.loss). Resume is exact: the
optimizer, scheduler and every RNG are restored and the Trainer skips the batches already seen
(the sampler is seeded by --seed), so k steps + resume = one run. Held-out perplexity
(``--eval NAME=FILE``) is token-weighted: exp(sum NLL / scored tokens), loram.eval.ppl. Under align --distill
each set also reports its KL to the teacher (``NAME_kl``: loram.distill, from the teacher's cached rows).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import progress
from ..configs import RunConfig
from ..data import packed_padding
from ..errors import LoramError
from ..device import compute_dtype, default_device, trainer_precision
from ..eval.ppl import loglik_sums
from ..eval.scoring import IGNORE
from ..io import is_disk_full, write_json, write_marker
from ..loss import TEACHER_KEYS, chunked_anchor_kl, chunked_causal_lm_loss, chunked_distill_loss, hidden_states_as_logits
from ..procmem import PeakRSS
from ..pruned_model import count_params
from .checkpoint import disk_full_in_checkpoint, is_main, last_checkpoint, mark_complete, prepare_checkpoint_dir
from .state import OPTIMIZER_JSON, SCHEDULER_JSON, load_optimizer_state, load_rng_state, plain, save_optimizer_state, save_rng_state
from .tracking import report_targets

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


class NonFiniteLoss(LoramError):
    pass


class TrainingInterrupted(LoramError):
    pass


def param_counts(model) -> tuple[int, int]:
    """(trainable, frozen) logical parameter counts (NF4 weights count as their full shape)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, count_params(model) - trainable


def _trainer_class():
    from transformers import Trainer

    class LoramTrainer(Trainer):
        """Trainer that stops on a non-finite loss (on every rank at once), marks complete checkpoints,
        and keeps optimizer / scheduler / RNG state in safetensors + JSON (resume never unpickles)."""

        def _plain_states(self) -> bool:
            return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

        def _save_optimizer_and_scheduler(self, output_dir):
            sched = self.lr_scheduler.state_dict()
            if not (self._plain_states() and plain(sched)):
                return super()._save_optimizer_and_scheduler(output_dir)
            if self.args.should_save:
                d = Path(output_dir)
                d.mkdir(parents=True, exist_ok=True)
                if not save_optimizer_state(self.optimizer.state_dict(), d):
                    return super()._save_optimizer_and_scheduler(output_dir)
                write_json(d / SCHEDULER_JSON, sched)

        def _load_optimizer_and_scheduler(self, checkpoint):
            d = Path(checkpoint) if checkpoint else None
            if d is None or not (d / OPTIMIZER_JSON).exists():
                return super()._load_optimizer_and_scheduler(checkpoint)
            self.optimizer.load_state_dict(load_optimizer_state(d))
            self.lr_scheduler.load_state_dict(json.loads((d / SCHEDULER_JSON).read_text()))

        def _save_rng_state(self, output_dir):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_rng_state(Path(output_dir), self.args.process_index)

        def _load_rng_state(self, checkpoint):
            if checkpoint is not None and not load_rng_state(Path(checkpoint), self.args.process_index):
                super()._load_rng_state(checkpoint)

        loss_chunk = 0  # RunConfig.loss_chunk, set by fit
        pad_id = 0  # the tokenizer's, set by fit

        def _track_num_input_tokens(self, inputs):
            if "position_ids" in inputs and "attention_mask" not in inputs:  # packed (data.collate): no 2-D mask to count by
                inputs = dict(inputs, attention_mask=~packed_padding(inputs["input_ids"], inputs["position_ids"], self.pad_id))
            super()._track_num_input_tokens(inputs)
        loram_settings = None  # run_settings(...), recorded in each checkpoint's marker for --resume to compare

        distill = None  # loram.distill.DistillLoss (align --distill), set by fit

        anchor = None  # loram.anchor.Anchor (train --anchor), set by fit
        anchor_next = None  # the next anchor micro-step: from the restored global step on the first call (resume)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.anchor is None or not model.training:
                return self._task_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = self._task_loss(model, inputs, True, num_items_in_batch)
            loss = loss + self._anchor_loss(model, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        def _task_loss(self, model, inputs, return_outputs, num_items_in_batch):
            chunk = self.loss_chunk
            soft = self.distill is not None and TEACHER_KEYS[0] in inputs  # batches carry the teacher's cached top-k
            if not (chunk or soft) or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            teacher = {k: inputs.pop(k) for k in TEACHER_KEYS} if soft else None
            peft = self.accelerator.unwrap_model(model)
            with hidden_states_as_logits(causal_lm_of(peft)) as head:
                outputs = model(**inputs)
                base = None
                if soft and self.distill.needs_base:  # --original-offset: the pruned base, adapter off, no gradient
                    with torch.no_grad(), peft.disable_adapter():
                        base = peft(**inputs).logits
            if base is not None:
                loss = self.distill(outputs.logits, base, head, labels, teacher, chunk, num_items_in_batch)
            elif soft:
                d = self.distill
                loss = chunked_distill_loss(outputs.logits, head, labels, teacher, d.temperature, d.lm_weight, chunk,
                                            num_items=num_items_in_batch)
            else:
                loss = chunked_causal_lm_loss(outputs.logits, head, labels, chunk, num_items=num_items_in_batch)
            # the stock path's rule: with num_items_in_batch the loss is a share of the accumulated
            # batch's mean (Trainer skips its own /grad_accum); across ranks it is summed back
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def _anchor_loss(self, model, num_items_in_batch):
            """--anchor's term for this micro-step: weight x KL(adapter off || on) on its blocks (loram.anchor)."""
            a, ga = self.anchor, self.args.gradient_accumulation_steps
            if self.anchor_next is None:
                self.anchor_next = self.state.global_step * ga
            ids = a.batch_at(self.anchor_next, self.args.process_index, self.args.world_size).to(self.args.device)
            self.anchor_next += 1
            peft = self.accelerator.unwrap_model(model)
            with hidden_states_as_logits(causal_lm_of(peft)) as head:
                hidden = model(input_ids=ids).logits
                with torch.no_grad(), peft.disable_adapter():
                    base = peft(input_ids=ids).logits
            kl = a.weight * chunked_anchor_kl(hidden, base, head, self.loss_chunk)
            # a per-micro-step mean; the Trainer divides the step's loss by the accumulation unless the task loss
            # was already a share of the accumulated batch (its rule in training_step): then divide here. DDP
            # averages the ranks' gradients, so the anchor is not scaled back up as the task loss is.
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
            return kl / ga if scaled else kl

        checked_at = -1  # the optimizer step stop_if_non_finite last looked at
        first_bad = None  # device tensor: the first optimizer step whose loss was non-finite (inf: none yet)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # no .item() or all_reduce here: a host sync every micro-step stalls the GPU's queue. The first
            # bad step is kept on the device and looked at when the Trainer logs or saves (stop_if_non_finite)
            if self.first_bad is None:
                self.first_bad = torch.tensor(float("inf"), device=loss.device)
            step = torch.tensor(float(self.state.global_step + 1), device=loss.device)
            bad = ~torch.isfinite(loss.detach()).all()
            self.first_bad = torch.where(bad, torch.minimum(self.first_bad, step), self.first_bad)
            return loss

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            # after each optimizer step, before anything is logged or saved: one sync per logging / saving
            # step (and the last), not per micro-step
            c, step = self.control, self.state.global_step
            if step != self.checked_at and (c.should_log or c.should_save or c.should_evaluate or step >= self.state.max_steps):
                self.checked_at = step  # the epoch's end calls this again for the same step
                self.stop_if_non_finite()
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def stop_if_non_finite(self):
            if self.first_bad is None:
                return
            first = self.first_bad.clone()
            if self.args.world_size > 1:  # all ranks must stop together or the next all-reduce hangs
                torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            if math.isfinite(first.item()):
                last = last_checkpoint(Path(self.args.output_dir))
                kept = f"last good checkpoint {last} kept" if last else "no checkpoint was saved yet"
                raise NonFiniteLoss(f"loss became non-finite at step {int(first.item())}, training stopped ({kept}): "
                                    "lower --lr, use --precision fp32 instead of bf16/fp16, or check the data")

        def _save_checkpoint(self, model, trial):
            if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                raise NonFiniteLoss(f"weights became non-finite at step {self.state.global_step}, not checkpointed "
                                    f"(last good checkpoint {last_checkpoint(Path(self.args.output_dir))} kept): lower --lr")
            super()._save_checkpoint(model, trial)
            if self.args.world_size > 1:  # every rank's RNG file is on disk before the marker says "complete"
                torch.distributed.barrier()
            if self.args.should_save:
                mark_complete(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}", self.state.global_step,
                              self.loram_settings)

    return LoramTrainer


def causal_lm_of(model):
    """The *ForCausalLM module inside a PEFT wrapper (the one that owns lm_head); DDP is unwrapped by the caller."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(m, "lm_head"):
        raise LoramError(f"--loss-chunk needs a causal LM with an lm_head, got {type(m).__name__}")
    return m


def run_precision(cfg: RunConfig) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype) of a train / align run: --precision (or --bf16) resolved for this process's
    device, refused here when the Trainer could not run it (fp16 off CUDA), before any weight is read."""
    device = default_device()
    dtype = compute_dtype(cfg.precision, device, cfg.bf16)  # TF32 on when fp32 on Ampere+
    trainer_precision(dtype, device)
    return device, dtype


def _eval_ppl(model, evals: dict, pad_id: int, cfg: RunConfig, autocast: torch.dtype | None = None, distill=None) -> dict:
    """name -> perplexity of each held-out set, and (``distill``: align --distill) name_kl -> its mean KL to the
    teacher per scored position. Under torchrun each rank scores its share of the rows and the log-likelihood
    sums are all-reduced (every rank scoring every row would take world x the time)."""
    rank, world = _rank_world()
    out = {}
    for n, ex in evals.items():
        with progress.stage(f"eval {n}"):
            if distill and n in distill.evals:  # perplexity and KL from one forward per batch; every row on this
                # rank: --distill runs in one process (distill.check_request refuses torchrun)
                sums, kl = distill.eval_sums(model, n, pad_id, cfg.micro_batch, autocast)
            else:
                sums, kl = loglik_sums(model, rank_share(ex, rank, world), pad_id, cfg.micro_batch, autocast), ()
        total = torch.tensor((*sums, *kl), dtype=torch.float64, device=next(model.parameters()).device)
        if world > 1:
            torch.distributed.all_reduce(total)
        loglik, tokens, *kl = total.tolist()
        # a set with no scored token reads as ppl 1 (as it always has) rather than failing a finished run
        out[n] = math.exp(-loglik / tokens) if tokens else 1.0
        if kl:
            out[f"{n}_kl"] = kl[0] / kl[1] if kl[1] else 0.0
    return out


def _eval_line(row: dict, evals: dict) -> str:
    """The printed line: "eval NAME ppl P[ kl K], ... (step S)" (kl under align --distill)."""
    kl = {n: f" kl {row[f'{n}_kl']:.4g}" if f"{n}_kl" in row else "" for n in evals}
    return "eval " + ", ".join(f"{n} ppl {row[n]:.3f}{kl[n]}" for n in evals) + f" (step {row['step']})"


def _history_row(logged: dict) -> dict:
    """An eval_history row back from the Trainer's log history (--resume): eval_NAME_ppl -> NAME, eval_NAME_kl -> NAME_kl."""
    return ({"step": logged["step"]} | {k[5:-4]: v for k, v in logged.items() if k.endswith("_ppl")}
            | {k[5:]: v for k, v in logged.items() if k.startswith("eval_") and k.endswith("_kl")})


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def rank_share(examples: list, rank: int, world: int) -> list:
    """Rows rank, rank + world, ... of ``examples``, padded with unscored rows (labels all ignored) to the
    same count on every rank: under FSDP each forward is a collective, so every rank must run as many
    batches as the others."""
    share = examples[rank::world]
    per = -(-len(examples) // world)
    if examples:
        blank = (examples[0][0], [IGNORE] * len(examples[0][0]))
        share = share + [blank] * (per - len(share))
    return share


def _callbacks(state_out: dict, evals: dict, pad_id: int, cfg: RunConfig, autocast: torch.dtype | None, distill=None):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        """Loss per logging step and held-out perplexity every eval_steps and at the last step, kept in the report
        and logged through the Trainer (its log history, so --resume restores it, and every --report-to tracker)."""

        trainer = None  # set by fit once the Trainer exists: its log() feeds the trackers

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                state_out["losses"].append({"step": state.global_step, "loss": float(logs["loss"])})

        def on_step_end(self, args, state, control, model=None, **kw):
            every = cfg.eval_steps or cfg.save_steps
            last = state.global_step >= state.max_steps  # evaluated here, while the trackers are still open
            if evals and (last or every and state.global_step % every == 0):
                row = {"step": state.global_step} | _eval_ppl(model, evals, pad_id, cfg, autocast, distill)
                state_out["eval_history"].append(row)
                if last:
                    state_out["final"] = {n: v for n, v in row.items() if n != "step"}
                should_log = control.should_log  # Trainer.log clears it: this step's loss must still be logged
                self.trainer.log({f"eval_{n}_ppl": row[n] for n in evals}  # + eval_NAME_kl under --distill
                                 | {f"eval_{n}_kl": row[f"{n}_kl"] for n in evals if f"{n}_kl" in row})
                control.should_log = should_log
                if state.is_world_process_zero:
                    print(_eval_line(row, evals), flush=True)

    return [Record()]


@dataclass
class FitResult:
    trainer: object
    steps: int
    wall_s: float
    tokens: int
    peak_rss_gb: float
    peak_cuda_gb: float | None
    losses: list
    eval_ppl: dict
    eval_history: list
    resumed_from: str | None
    eval_kl: dict  # align --distill: name -> final KL to the teacher ({} otherwise)


def fit(model, dataset, collator, cfg: RunConfig, ckpt: Path, resume: bool, overwrite: bool, evals: dict | None = None,
        pad_id: int = 0, callbacks: list | None = None, settings: dict | None = None, distill=None,
        anchor=None) -> FitResult:
    """Run transformers' Trainer on ``model`` (LoRA-wrapped or with its own requires_grad set).

    Works unchanged under torchrun / accelerate launch (DDP; FSDP and DeepSpeed through accelerate's
    config): the Trainer reads the launcher's environment. On a CPU-only machine it must be told
    use_cpu=True, else each rank trains alone with no error.

    distill: a loram.distill.DistillLoss (temperature, lm_weight): batches that carry the teacher's
    cached top-k (loss.TEACHER_KEYS) are scored by loss.chunked_distill_loss instead of the LM loss.
    anchor: a loram.anchor.Anchor (train --anchor): each micro-step adds its KL term on general-text blocks.
    """
    from transformers import TrainingArguments

    if cfg.schedule not in SCHEDULES:
        raise LoramError(f"unknown schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if cfg.steps < 1 and cfg.epochs is None:
        raise LoramError(f"--steps {cfg.steps} must be >= 1 (or give --epochs)")
    if cfg.loss_chunk < 0:
        raise LoramError(f"--loss-chunk {cfg.loss_chunk} must be >= 0 (0: the stock loss)")
    if len(dataset) == 0:
        raise LoramError("the training set is empty after formatting: give rows with text to learn")
    ckpt = Path(ckpt)
    resume_from = prepare_checkpoint_dir(ckpt, resume, overwrite, is_main())
    fresh = not ckpt.exists() or not any(ckpt.iterdir())  # never mark a folder that holds someone else's files
    report_to = report_targets(cfg.report_to)  # tensorboard writes under the checkpoint folder (tracking.py)
    if is_main() and (cfg.save_steps or ckpt.exists() or "tensorboard" in report_to) and fresh:  # loram's: --overwrite may empty it
        ckpt.mkdir(parents=True, exist_ok=True)
        write_marker(ckpt, "checkpoints")
    cpu = not torch.cuda.is_available()
    device, dtype = run_precision(cfg)
    autocast = None if dtype == torch.float32 else dtype
    args = TrainingArguments(
        output_dir=str(ckpt), max_steps=cfg.steps if cfg.epochs is None else -1,
        num_train_epochs=cfg.epochs or 1, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule,
        warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, seed=cfg.seed, data_seed=cfg.seed,
        **trainer_precision(dtype, device), use_cpu=cpu, report_to=report_to, disable_tqdm=not progress.enabled(),
        remove_unused_columns=False,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", optim="adamw_torch",
        save_only_model=False, logging_nan_inf_filter=False, ddp_find_unused_parameters=False,
    )
    out = {"losses": [], "eval_history": []}
    record = _callbacks(out, evals or {}, pad_id, cfg, autocast, distill)
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collator,
                               callbacks=record + list(callbacks or []))
    record[0].trainer = trainer
    if (cfg.loss_chunk or distill is not None or anchor is not None) and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        what = "--distill" if distill is not None else "--anchor" if anchor is not None else "--loss-chunk"
        raise LoramError(f"{what} calls lm_head outside the model's forward, which FSDP / DeepSpeed sharding "
                         f"do not allow: drop {what}")
    trainer.loss_chunk = cfg.loss_chunk
    trainer.distill = distill
    trainer.anchor = anchor
    trainer.pad_id = pad_id
    trainer.loram_settings = settings
    progress.trainer_quiet(trainer)
    if resume_from is not None:  # restore the history so the report covers the whole run
        prev = json.loads((resume_from / "trainer_state.json").read_text())
        out["losses"] = [{"step": r["step"], "loss": float(r["loss"])} for r in prev.get("log_history", []) if "loss" in r]
        out["eval_history"] = [_history_row(r) for r in prev.get("log_history", []) if any(k.endswith("_ppl") for k in r)]
    peak = PeakRSS()
    t0 = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        last = last_checkpoint(ckpt)
        kept = f"checkpoint {last} kept, continue with --resume" if last else "no checkpoint saved yet (use --save-steps)"
        raise TrainingInterrupted(f"interrupted (Ctrl-C) at step {trainer.state.global_step}: {kept}") from None
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise disk_full_in_checkpoint(ckpt, trainer.state.global_step) from None
    wall = time.time() - t0
    final = out.get("final")
    if final is None:  # no step ran (resumed at the end) or no --eval: evaluate the weights as they are
        final = _eval_ppl(trainer.model, evals or {}, pad_id, cfg, autocast, distill)
        if final:
            out["eval_history"].append({"step": trainer.state.global_step} | final)
    tokens = int(trainer.state.num_input_tokens_seen or 0) - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    ppl = {n: final[n] for n in evals or {} if n in final}  # final also holds NAME_kl under --distill
    kl = {n: final[f"{n}_kl"] for n in evals or {} if f"{n}_kl" in final}
    return FitResult(trainer, trainer.state.global_step, wall, tokens, peak.gb(), PeakRSS.cuda_gb(), out["losses"], ppl,
                     out["eval_history"], str(resume_from) if resume_from else None, kl)


def finish(trainer) -> None:
    """Let every rank reach this point before any returns (rank 0 may still be writing)."""
    if trainer.args.world_size > 1:
        torch.distributed.barrier()
