"""`loram train`: LoRA (or QLoRA) on a pruned model folder or an ordinary HF model.

Memory of LoRA training (why LoRAM prunes the base first):

    frozen base weights  P_base * bytes      <- dominant for large models; LoRAM shrinks P_base,
                                                NF4 (QLoRAM) shrinks the bytes to ~0.5
    LoRA params+grads+AdamW   16 B * r * sum(in + out) over targets   (tiny)
    activations          ~ batch * seq * layers * widths (checkpointing keeps one layer's)

The adapter folder written here carries the plan and the base fingerprint, so `loram recover`
needs nothing else. ``fit`` is the one Trainer setup shared by `loram train` and `loram align`:

    OUT-checkpoints/checkpoint-N/     Trainer checkpoint: weights (safetensors), optimizer.safetensors
                                      + optimizer.json, scheduler.json, rng_state_<rank>.{safetensors,json},
                                      trainer_state.json, and loram_checkpoint.json written last: a
                                      checkpoint without it (killed mid-write) is ignored by --resume
                                      and deleted. No state is pickled, so resuming never unpickles
                                      (DeepSpeed/FSDP runs keep their engines' own formats).

Resume is exact: the optimizer, scheduler and every RNG are restored and the Trainer skips the
batches already seen (the sampler is seeded by --seed), so k steps + resume = one run.
Each checkpoint's loram_checkpoint.json records the settings that define the run (run_settings:
knobs, data names and content digests, model fingerprint); --resume with other values is refused,
listing them (only RESUME_SAFE may change: the step budget, saving, logging, evaluation).
Held-out perplexity (``--eval NAME=FILE``) is token-weighted: exp(sum NLL / response tokens).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import progress
from .adapter import ADAPTER_META, STAGE_PRUNED, write_adapter
from .errors import LoramError
from .io import (DiskFull, atomic_dir, check_checkpoint_dir, check_output, is_disk_full, load_tokenizer, releases_locks,
                 write_json, write_marker)
from .loading import load_model
from .plan import has_plan

DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
TARGET_MODULES = {r: f"{r}_proj" for r in DEFAULT_TARGETS} | {"lm_head": "lm_head"}
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
CHECKPOINT_MARK = "loram_checkpoint.json"
OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON = "optimizer.safetensors", "optimizer.json", "scheduler.json"


@dataclass
class RunConfig:
    """Optimisation knobs shared by `loram train` and `loram align`."""

    data: list[str]
    data_weights: list[float] | None = None
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.03  # fraction of steps (< 1) or a step count (>= 1)
    steps: int = 100
    epochs: float | None = None
    micro_batch: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    save_steps: int = 0
    logging_steps: int = 10
    eval: dict[str, str] = field(default_factory=dict)  # name -> held-out file
    eval_steps: int = 0  # 0: every --save-steps, else only at the end
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # 0: transformers' loss (full fp32 logits: batch x seq x vocab x 4 B, ~4 live copies with their
    # gradients: 0.1 GB each per 512 tokens at vocab 49152). N: lm_head + cross-entropy N positions at a time (loram.loss), the
    # same value; costs one extra lm_head matmul per token. Pays off when the base is small (pruned).
    loss_chunk: int = 0


@dataclass
class TrainConfig(RunConfig):
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    quantize: str | None = None
    train_on_inputs: bool = False
    packing: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class TrainReport:
    out: str
    steps: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    peak_rss_gb: float
    peak_cuda_gb: float | None
    trainable_params: int
    frozen_params: int
    losses: list = field(default_factory=list)
    dropped: dict = field(default_factory=dict)  # training rows skipped: reason -> count, and "total"
    eval_ppl: dict = field(default_factory=dict)  # name -> final perplexity
    eval_history: list = field(default_factory=list)  # [{"step", name: ppl, ...}]
    resumed_from: str | None = None
    eval_dropped: dict = field(default_factory=dict)  # --eval NAME -> {reason: count, "total"}

    def summary(self) -> str:
        cuda = f", CUDA peak {self.peak_cuda_gb:.2f} GB" if self.peak_cuda_gb is not None else ""
        ppl = "".join(f", ppl {k} {v:.3f}" for k, v in self.eval_ppl.items())
        return (f"{self.steps} steps in {self.wall_s:.1f} s, {self.tokens_per_s:.0f} tokens/s, peak RSS {self.peak_rss_gb:.2f} GB{cuda}, "
                f"trainable {self.trainable_params:,} / frozen {self.frozen_params:,} parameters{ppl}")


class NonFiniteLoss(LoramError):
    pass


class TrainingInterrupted(LoramError):
    pass


# ---- model and data -------------------------------------------------------------------------
def load_base(model: str | Path, quantize: str | None, bf16: bool):
    """(model, plan or None, base fingerprint) for a pruned folder or an ordinary model (the tokenizer is
    loaded first, by train)."""
    from .fingerprint import base_fingerprint
    from .loading import load_pruned_model
    from .nf4 import quantize_nf4

    dtype = torch.bfloat16 if bf16 and quantize is None else torch.float32
    if Path(str(model)).is_dir() and has_plan(model):
        m, plan = load_pruned_model(model, quantize=quantize, dtype=dtype, device_map="auto")
        return m, plan, plan.base["fingerprint"]
    m = load_model(model, dtype=dtype)
    # fingerprint the original now: after NF4 or PEFT wrapping the state dict no longer shows its weights
    fp = base_fingerprint(model, m)
    if quantize == "nf4":
        quantize_nf4(m)
    elif quantize is not None:
        raise LoramError(f"--quantize {quantize!r} is not supported: use nf4")
    if torch.cuda.is_available():
        m.to("cuda")
    return m, None, fp


def mix(sources: list[list], weights: list[float] | None, seed: int) -> list:
    """One list drawing from each source in proportion to its weight (total = sum of sizes).

    Source i gets round(total * w_i / sum w) items: a random subset when that is fewer than it
    has, sampled with replacement (upsampling) when more.
    """
    weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise LoramError(f"{len(weights)} mixture weights for {len(sources)} datasets: give one weight per --data")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise LoramError(f"mixture weights {weights} must be >= 0 with a positive sum: e.g. --data a.jsonl=0.7 --data b.jsonl=0.3")
    g = torch.Generator().manual_seed(seed)
    total, out = sum(len(s) for s in sources), []
    for s, w in zip(sources, weights):
        n = round(total * w / sum(weights))
        if n == 0:
            continue
        idx = torch.randint(len(s), (n,), generator=g).tolist() if n > len(s) else \
            torch.randperm(len(s), generator=g)[:n].tolist()
        out += [s[i] for i in idx]
    return out


def with_total(skipped: dict[str, int]) -> dict[str, int]:
    return dict(skipped) | {"total": sum(skipped.values())}


def build_dataset(tok, cfg: TrainConfig):
    """(ListDataset, rows skipped: reason -> count and "total") of the training mixture."""
    from .data import ListDataset, encode_all, pack, read_rows

    encoded = [encode_all(tok, read_rows(src), cfg.seq_len, cfg.train_on_inputs, name=f"--data {src}") for src in cfg.data]
    parts = mix([e.examples for e in encoded], cfg.data_weights, cfg.seed)
    if cfg.packing:
        parts = pack(parts, cfg.seq_len)
    skipped: dict[str, int] = {}
    for e in encoded:
        for reason, n in e.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return ListDataset(parts), with_total(skipped)


def eval_sets(tok, cfg: RunConfig) -> tuple[dict, dict]:
    """(name -> examples of each --eval set, same formatting and masking as training; name -> rows skipped)."""
    from .data import encode_all, read_rows

    enc = {name: encode_all(tok, read_rows(src), cfg.seq_len, False, name=f"--eval {name}") for name, src in cfg.eval.items()}
    return {n: e.examples for n, e in enc.items()}, {n: with_total(e.skipped) for n, e in enc.items()}


# ---- what --resume may change ------------------------------------------------------------------
# Safe: these extend the run or change what is saved, logged or evaluated, not the path the weights
# take. Everything else (lr, schedule, data, rank, seed, ...) must equal the checkpoint's run: a
# resume with other values is neither run, and its adapter would record settings it was not trained with.
RESUME_SAFE = ("steps", "epochs", "tokens", "save_steps", "logging_steps", "eval", "eval_steps", "grad_checkpointing")


def model_identity(model: str | Path) -> str:
    """Fingerprint id of a local model folder (pruned or original; sampled rows, no load), else its name."""
    from .fingerprint import base_fingerprint
    from .io import resolve_model

    path, gguf = resolve_model(model)
    return base_fingerprint(model)["id"] if gguf is None and Path(path).is_dir() else str(model)


def run_settings(cfg: RunConfig, model: str | Path) -> dict:
    """The settings that define a run's trajectory, as JSON (recorded in every checkpoint)."""
    from .data import source_digest

    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_SAFE and k != "extra"}
    d["data_sha256"] = [source_digest(src) for src in cfg.data]
    # a local file is known by its name (with any [a:b] slice) and content: moving it is fine
    d["data"] = [src if digest is None else Path(src).name for src, digest in zip(cfg.data, d["data_sha256"])]
    d["model"] = model_identity(model)
    return json.loads(json.dumps(d))  # tuples become lists, as they read back from the checkpoint


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def settings_differences(old: dict, new: dict) -> list[str]:
    """["--lr 0.0002 -> 0.001", ...] for every recorded setting that changed."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "data_sha256":
            names = [n for n, x, y in zip(new.get("data") or [], a or [], b or []) if x != y]
            out.append(f"content of {', '.join(names)} changed" if names else "data file content changed")
        elif k == "model":
            out.append(f"model fingerprint {a} -> {b}")
        else:
            out.append(f"--{k.replace('_', '-')} {_show(a)} -> {_show(b)}")
    return out


def check_resume_settings(ckpt: Path, settings: dict) -> None:
    """Refuse --resume when the run's defining settings differ from those the last checkpoint recorded."""
    last = last_checkpoint(ckpt)
    if last is None:  # prepare_checkpoint_dir explains
        return
    try:
        old = json.loads((last / CHECKPOINT_MARK).read_text()).get("settings")
    except (ValueError, AttributeError):
        raise LoramError(f"{last / CHECKPOINT_MARK} is corrupt: delete {last} to resume from the one before, "
                         "or start over with --overwrite") from None
    if old is None:  # written before checkpoints recorded their settings: nothing to compare
        return
    diffs = settings_differences(old, settings)
    if diffs:
        safe = ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_SAFE)
        raise LoramError(f"--resume with other settings than {last.name} was trained with ({'; '.join(diffs)}): give the "
                         f"original values (only {safe} and --checkpoint-dir may change), or start a new run (no --resume, with --overwrite)")


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    bad = [t for t in cfg.targets if t not in TARGET_MODULES]
    if bad or not cfg.targets:
        raise LoramError(f"unknown --targets {bad}: choose from {', '.join(TARGET_MODULES)}")
    if cfg.rank < 1:
        raise LoramError(f"--rank {cfg.rank} must be >= 1: e.g. 8")
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=[TARGET_MODULES[t] for t in cfg.targets], task_type="CAUSAL_LM")


def param_counts(model) -> tuple[int, int]:
    """(trainable, frozen) logical parameter counts (NF4 weights count as their full shape)."""
    from .pruned import count_params

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, count_params(model) - trainable


@torch.no_grad()
def perplexity(model, examples, pad_id: int, batch: int = 4, bf16: bool = False) -> float:
    """exp(mean NLL over every labelled token) of ``examples`` [(ids, labels)], in eval mode."""
    from .data import collate

    was = model.training
    model.eval()
    dev = next(p for p in model.parameters()).device
    fn, nll, count = collate(pad_id), 0.0, 0
    for i in range(0, len(examples), batch):
        b = fn([{"input_ids": x, "labels": y} for x, y in examples[i:i + batch]])
        b = {k: v.to(dev) for k, v in b.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), b["labels"][:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was)
    return math.exp(nll / max(count, 1))


# ---- checkpoints ------------------------------------------------------------------------------
def complete_checkpoints(ckpt: Path) -> list[Path]:
    """Checkpoints whose save finished (marker written last), oldest first."""
    if not ckpt.is_dir():
        return []
    found = [p for p in ckpt.glob("checkpoint-*") if p.is_dir() and (p / CHECKPOINT_MARK).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def last_checkpoint(ckpt: Path) -> Path | None:
    done = complete_checkpoints(ckpt)
    return done[-1] if done else None


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as h:
                os.fsync(h.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_checkpoint_dir(ckpt: Path, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None: fresh start); refuses to mix two runs in one folder."""
    if resume:
        last = last_checkpoint(ckpt)
        if last is None:
            raise LoramError(f"--resume: no complete checkpoint in {ckpt}: start without --resume (and use --save-steps)")
        if is_main:  # partial checkpoints (killed mid-save) newer than the last good one
            for p in ckpt.glob("checkpoint-*"):
                if p.is_dir() and not (p / CHECKPOINT_MARK).exists():
                    shutil.rmtree(p, ignore_errors=True)
        return last
    if ckpt.exists() and any(ckpt.glob("checkpoint-*")):
        if not overwrite:
            raise LoramError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite to start over")
        if is_main:
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


# ---- the shared Trainer ----------------------------------------------------------------------
def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _plain(obj) -> bool:
    try:
        json.dumps(obj)
        return True
    except (TypeError, ValueError):
        return False


def save_optimizer_state(sd: dict, folder: Path) -> bool:
    """Optimizer state as optimizer.safetensors (tensors) + optimizer.json (the rest); False if not JSON-able."""
    from safetensors.torch import save_file

    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                state[str(pid)][k] = None  # placeholder: the value is in the safetensors file
            else:
                state[str(pid)][k] = v
    meta = {"state": state, "param_groups": sd["param_groups"]}
    if not _plain(meta):
        return False
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    write_json(folder / OPTIMIZER_JSON, meta)
    return True


def load_optimizer_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    meta, tensors = json.loads((folder / OPTIMIZER_JSON).read_text()), load_file(str(folder / OPTIMIZER_TENSORS))
    state = {int(pid): {k: tensors[f"{pid}.{k}"] if v is None else v for k, v in st.items()} for pid, st in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng_state_{rank}.safetensors", folder / f"rng_state_{rank}.json"


def save_rng_state(folder: Path, rank: int) -> None:
    """Python, NumPy, torch CPU (and CUDA) generator states, without pickle."""
    import random

    import numpy as np
    from safetensors.torch import save_file

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    t, j = rng_files(folder, rank)
    save_file(tensors, str(t))
    write_json(j, {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]})


def load_rng_state(folder: Path, rank: int) -> bool:
    import random

    import numpy as np
    from safetensors.torch import load_file

    t, j = rng_files(folder, rank)
    if not (t.exists() and j.exists()):
        return False
    meta, tensors = json.loads(j.read_text()), load_file(str(t))
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


def _trainer_class():
    from transformers import Trainer

    class LoramTrainer(Trainer):
        """Trainer that stops on a non-finite loss (on every rank at once), marks complete checkpoints,
        and keeps optimizer / scheduler / RNG state in safetensors + JSON (resume never unpickles)."""

        def _plain_states(self) -> bool:
            return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

        def _save_optimizer_and_scheduler(self, output_dir):
            sched = self.lr_scheduler.state_dict()
            if not (self._plain_states() and _plain(sched)):
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
        loram_settings = None  # run_settings(...), recorded in each checkpoint's marker for --resume to compare

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            chunk = self.loss_chunk
            if not chunk or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from .loss import chunked_causal_lm_loss, hidden_states_as_logits

            inputs = dict(inputs)
            labels = inputs.pop("labels")
            with hidden_states_as_logits(causal_lm_of(self.accelerator.unwrap_model(model))) as head:
                outputs = model(**inputs)
            loss = chunked_causal_lm_loss(outputs.logits, head, labels, chunk, num_items=num_items_in_batch)
            # the stock path's rule: with num_items_in_batch the loss is a share of the accumulated
            # batch's mean (Trainer skips its own /grad_accum); across ranks it is summed back
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device)
            if self.args.world_size > 1:  # all ranks must stop together or the next all-reduce hangs
                torch.distributed.all_reduce(bad)
            if bad.item() > 0:
                last = last_checkpoint(Path(self.args.output_dir))
                kept = f"last good checkpoint {last} kept" if last else "no checkpoint was saved yet"
                raise NonFiniteLoss(f"loss became non-finite at step {self.state.global_step + 1}, training stopped ({kept}): "
                                    "lower --lr, use fp32 instead of --bf16, or check the data")
            return loss

        def _save_checkpoint(self, model, trial):
            if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                raise NonFiniteLoss(f"weights became non-finite at step {self.state.global_step}, not checkpointed "
                                    f"(last good checkpoint {last_checkpoint(Path(self.args.output_dir))} kept): lower --lr")
            super()._save_checkpoint(model, trial)
            if self.args.world_size > 1:  # every rank's RNG file is on disk before the marker says "complete"
                torch.distributed.barrier()
            if self.args.should_save:
                d = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                (d / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody reads on resume
                _fsync_dir(d)
                mark = {"step": self.state.global_step, "complete": True, "settings": self.loram_settings}
                (d / CHECKPOINT_MARK).write_text(json.dumps(mark) + "\n")
                _fsync_dir(d)

    return LoramTrainer


def causal_lm_of(model):
    """The *ForCausalLM module inside a PEFT wrapper (the one that owns lm_head); DDP is unwrapped by the caller."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(m, "lm_head"):
        raise LoramError(f"--loss-chunk needs a causal LM with an lm_head, got {type(m).__name__}")
    return m


def _callbacks(state_out: dict, evals: dict, pad_id: int, cfg: RunConfig):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        """Loss per logging step and held-out perplexity every eval_steps, kept in the report."""

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                state_out["losses"].append({"step": state.global_step, "loss": float(logs["loss"])})

        def on_step_end(self, args, state, control, model=None, **kw):
            every = cfg.eval_steps or cfg.save_steps
            if evals and every and state.global_step % every == 0 and state.global_step < state.max_steps:
                row = {"step": state.global_step} | {n: perplexity(model, ex, pad_id, cfg.micro_batch, cfg.bf16)
                                                      for n, ex in evals.items()}
                state_out["eval_history"].append(row)
                state.log_history.append({f"eval_{n}_ppl": v for n, v in row.items() if n != "step"} | {"step": row["step"]})
                if state.is_world_process_zero:
                    print("eval " + ", ".join(f"{n} ppl {v:.3f}" for n, v in row.items() if n != "step") + f" (step {row['step']})",
                          flush=True)

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


def fit(model, dataset, collator, cfg: RunConfig, ckpt: Path, resume: bool, overwrite: bool, evals: dict | None = None,
        pad_id: int = 0, callbacks: list | None = None, settings: dict | None = None) -> FitResult:
    """Run transformers' Trainer on ``model`` (LoRA-wrapped or with its own requires_grad set).

    Works unchanged under torchrun / accelerate launch (DDP; FSDP and DeepSpeed through accelerate's
    config): the Trainer reads the launcher's environment. On a CPU-only machine it must be told
    use_cpu=True, else each rank trains alone with no error.
    """
    from transformers import TrainingArguments

    from .memory import PeakRSS

    if cfg.schedule not in SCHEDULES:
        raise LoramError(f"unknown schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if cfg.steps < 1 and cfg.epochs is None:
        raise LoramError(f"--steps {cfg.steps} must be >= 1 (or give --epochs)")
    if cfg.loss_chunk < 0:
        raise LoramError(f"--loss-chunk {cfg.loss_chunk} must be >= 0 (0: the stock loss)")
    if len(dataset) == 0:
        raise LoramError("the training set is empty after formatting: give rows with text to learn")
    ckpt = Path(ckpt)
    resume_from = prepare_checkpoint_dir(ckpt, resume, overwrite, _is_main())
    fresh = not ckpt.exists() or not any(ckpt.iterdir())  # never mark a folder that holds someone else's files
    if _is_main() and (cfg.save_steps or ckpt.exists()) and fresh:  # mark it loram's: a later --overwrite may empty it
        ckpt.mkdir(parents=True, exist_ok=True)
        write_marker(ckpt, "checkpoints")
    cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(ckpt), max_steps=cfg.steps if cfg.epochs is None else -1,
        num_train_epochs=cfg.epochs or 1, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule,
        warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, seed=cfg.seed, data_seed=cfg.seed,
        bf16=cfg.bf16, use_cpu=cpu, report_to=[], disable_tqdm=not progress.enabled(), remove_unused_columns=False,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding", optim="adamw_torch",
        save_only_model=False, logging_nan_inf_filter=False, ddp_find_unused_parameters=False,
    )
    out = {"losses": [], "eval_history": []}
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collator,
                               callbacks=_callbacks(out, evals or {}, pad_id, cfg) + list(callbacks or []))
    if cfg.loss_chunk and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise LoramError("--loss-chunk calls lm_head outside the model's forward, which FSDP / DeepSpeed sharding do not allow: drop --loss-chunk")
    trainer.loss_chunk = cfg.loss_chunk
    trainer.loram_settings = settings
    progress.trainer_quiet(trainer)
    if resume_from is not None:  # restore the history so the report covers the whole run
        prev = json.loads((resume_from / "trainer_state.json").read_text())
        out["losses"] = [{"step": r["step"], "loss": float(r["loss"])} for r in prev.get("log_history", []) if "loss" in r]
        out["eval_history"] = [{"step": r["step"]} | {k[5:-4]: v for k, v in r.items() if k.endswith("_ppl")}
                               for r in prev.get("log_history", []) if any(k.endswith("_ppl") for k in r)]
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
        raise _disk_full_in_checkpoint(ckpt, trainer.state.global_step) from None
    wall = time.time() - t0
    evals = evals or {}
    final = {n: perplexity(trainer.model, ex, pad_id, cfg.micro_batch, cfg.bf16) for n, ex in evals.items()}
    if final:
        out["eval_history"].append({"step": trainer.state.global_step} | final)
    tokens = int(trainer.state.num_input_tokens_seen or 0) - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    return FitResult(trainer, trainer.state.global_step, wall, tokens, peak.gb(), PeakRSS.cuda_gb(), out["losses"], final,
                     out["eval_history"], str(resume_from) if resume_from else None)


def _disk_full_in_checkpoint(ckpt: Path, step: int) -> DiskFull:
    from .io import disk_full

    if _is_main():  # the half-written checkpoint (no completion mark) is useless: give its space back
        for p in ckpt.glob("checkpoint-*"):
            if p.is_dir() and not (p / CHECKPOINT_MARK).exists():
                shutil.rmtree(p, ignore_errors=True)
    return disk_full(ckpt, what=f"the checkpoint of step {step} was not saved, {_kept(ckpt)}")


def _kept(ckpt: Path) -> str:
    last = last_checkpoint(ckpt)
    return (f"the last good checkpoint {last} is kept: continue with --resume once space is freed" if last
            else "no checkpoint was saved, the training is lost (--save-steps keeps checkpoints)")


def save_final(ckpt: Path, save) -> None:
    """Write the final output; on a full disk the error says which checkpoint survives."""
    try:
        save()
    except DiskFull as e:
        if _is_main() and ckpt.is_dir() and not any(ckpt.glob("checkpoint-*")):  # nothing to resume from: leave nothing
            shutil.rmtree(ckpt, ignore_errors=True)
        raise DiskFull(f"{e}; {_kept(ckpt)}") from None


def finish(trainer) -> None:
    """Let every rank reach this point before any returns (rank 0 may still be writing)."""
    if trainer.args.world_size > 1:
        torch.distributed.barrier()


# ---- loram train -------------------------------------------------------------------------------
@releases_locks
def train(model_name: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          checkpoint_dir: str | Path | None = None, callbacks: list | None = None) -> TrainReport:
    from peft import get_peft_model

    from .data import collate, skip_summary
    from .validate import check_config

    check_config(cfg, "train")  # the CLI flags' ranges, for Python callers too, before any load
    inputs = (model_name, *cfg.data, *(cfg.eval or {}).values())
    check_output(out, overwrite, inputs)
    ckpt = check_checkpoint_dir(checkpoint_dir or f"{out}-checkpoints", resume, overwrite, inputs)
    settings = run_settings(cfg, model_name) if resume or cfg.save_steps else None  # only checkpoints need them
    if resume:
        check_resume_settings(ckpt, settings)
    # tokenizer and data before the weights: a bad file, row or chat template fails in seconds
    tok = load_tokenizer(model_name)
    dataset, dropped = build_dataset(tok, cfg)
    evals, eval_dropped = eval_sets(tok, cfg)
    if _is_main():
        for what, skipped in [("--data", dropped)] + [(f"--eval {n}", d) for n, d in eval_dropped.items()]:
            if skipped["total"]:
                print(f"{what}: {skip_summary(skipped)}", flush=True)
    torch.manual_seed(cfg.seed)
    model, plan, base_fp = load_base(model_name, cfg.quantize, cfg.bf16)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    pm = get_peft_model(model, lora_config(cfg))
    trainable, frozen = param_counts(pm)
    r = fit(pm, dataset, collate(tok.pad_token_id), cfg, ckpt, resume, overwrite, evals, tok.pad_token_id, callbacks, settings)
    report = TrainReport(str(out), r.steps, r.wall_s, r.tokens, r.tokens / max(r.wall_s, 1e-9), r.peak_rss_gb, r.peak_cuda_gb,
                         trainable, frozen, r.losses, dropped, r.eval_ppl, r.eval_history, r.resumed_from, eval_dropped)
    if r.trainer.args.process_index == 0:
        save_final(ckpt, lambda: save_adapter(pm, out, model_name, plan, cfg, report, overwrite, inputs, base_fp))
    finish(r.trainer)
    return report


def save_adapter(pm, out, model_name, plan, cfg: TrainConfig, report: TrainReport, overwrite: bool, inputs=(),
                 base_fp: dict | None = None) -> None:
    """``base_fp``: the original's fingerprint taken at load time (load_base), for an adapter of an original."""
    from peft import get_peft_model_state_dict

    from .fingerprint import base_fingerprint

    sd = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(pm, save_embedding_layers=False).items()}
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
    with atomic_dir(out, overwrite, "train", inputs) as tmp:
        write_adapter(tmp, sd, lcfg, meta, plan)
        write_json(Path(tmp) / "train_report.json", asdict(report))
    assert (Path(out) / ADAPTER_META).exists()
