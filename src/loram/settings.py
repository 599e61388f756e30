"""One settings record per stage: the single place its knobs are declared.

Each stage of the pipeline (prune, align, train, recover, merge, eval) has a table of knobs, one
:class:`Knob` per field of its settings record: its help text, its validator (``loram.validate``),
its choices, whether it is a switch or repeatable, whether it has a command-line flag and whether a
recipe may set it. From that table derive

* the verb's flags: ``add_flags(parser, stage)`` (``--micro-batch`` for field ``micro_batch``);
* the recipe schema: ``recipe_keys(stage)`` and ``check_recipe_section`` (same names, underscores);
* the library's checks: ``check_knobs`` / ``check_config`` (below) look ranges up here;
* the record itself: ``record(stage, values)`` from parsed flags or a recipe section.

Prune, recover, merge and eval records are dataclasses defined here, their knobs in field metadata.
Train and align use ``TrainConfig`` / ``AlignConfig`` (loram.train, loram.align: imported only when a
record is built, they load torch); their knobs are tables keyed by field name, with the flags'
defaults (a test checks they equal the dataclasses' defaults).
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import MISSING, dataclass, field, fields, replace

from .configs import LONG_ROWS, PRECISIONS, AlignConfig, TrainConfig
from .errors import LoramError
from .prune_plan import ALLOCATIONS
from .validate import ATTN_RATIO, COUNT, COUNT_OR_OFF, DROPOUT, NON_NEGATIVE, POSITIVE, RATIO, SEED, SEQ_LEN, Number

STAGES = ("prune", "align", "train", "recover", "merge", "eval")
EVAL_TARGETS = ("merged", "adapter", "base")


@dataclass(frozen=True)
class Knob:
    """How one setting is given: on the command line (``--name-with-dashes``) and in a recipe (``name``)."""

    default: object = None  # the flag's default (for a dataclass record: its field's)
    help: str | None = None
    check: Number | None = None  # argparse type= and the recipe's validator
    choices: tuple | None = None
    switch: bool = False  # store_true flag; a recipe writes true/false
    repeat: bool = False  # repeatable flag (action=append); a recipe writes a list
    metavar: str | None = None
    required: bool = False
    flag: bool = True  # False: recipes and the Python API only (no flag)
    recipe: bool = True  # False: command line only
    # False: decides how a stage runs, not what it writes (a memory budget): left out of the recipe's stage
    # hash, so giving a recipe more or less memory does not re-run stages that are done
    outcome: bool = True

    def checker(self, name: str) -> Number | None:
        """The validator, named as its messages name it: the flag (``--lr``) or, without one, the field."""
        return self.check.named(flag_name(name) if self.flag else name) if self.check is not None else None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def knob(default=None, **kw):
    """A dataclass field with its Knob (a list default becomes a default_factory)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"knob": Knob(**kw)})
    return field(default=default, metadata={"knob": Knob(**kw)})


# ---- prune, recover, merge, eval: records defined here ------------------------------------------
CALIB = "taylor/fisher/wanda-sp/sparsegpt/wanda: "
MAX_MEMORY_HELP = ("memory budget in GB (default: what the memory cgroup's limit leaves, else MemAvailable): when the "
                   "predicted in-memory peak does not fit, the model is streamed layer by layer (loram.budget)")


PRECISION_HELP = ("compute dtype: auto (default: bf16 on a GPU that has it, fp16 + loss scaling before Ampere, fp32 on a CPU, "
                  "where bf16 backward is 60-150x slower), bf16, fp16 (CUDA only) or fp32 (TF32 matmuls on Ampere+)")
BF16_HELP = "same as --precision bf16 (the older flag, kept for recipes and scripts)"
PRECISION = Knob("auto", choices=PRECISIONS, metavar="|".join(PRECISIONS), help=PRECISION_HELP)


def precision_knob():
    """The --precision field of a dataclass record (prune, eval); train/align take PRECISION in their table."""
    return knob("auto", choices=PRECISIONS, metavar="|".join(PRECISIONS), help=PRECISION_HELP)


def precision_of(precision: str | None, bf16: bool = False) -> str:
    """The --precision a run asked for, with the old --bf16 switch read as --precision bf16 (recipes write
    `bf16: true`); both given and different is refused (which one was meant is not knowable)."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise LoramError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not bf16:
        return precision
    if precision not in ("auto", "bf16"):
        raise LoramError(f"--bf16 and --precision {precision} disagree: drop --bf16 (it means --precision bf16)")
    return "bf16"


def max_memory_knob():
    """The --max-memory field of the stages that can stream (prune, merge, eval): a budget, not a result."""
    return knob(None, check=POSITIVE, metavar="GB", outcome=False, help=MAX_MEMORY_HELP)


@dataclass
class PruneSettings:
    """``loram prune`` / a recipe's ``prune:`` (the keyword arguments of ``loram.prune.prune``)."""

    method: str = knob("taylor", help="structured: random | magnitude | taylor (default) | fisher | wanda-sp; sparse: sparsegpt | wanda | "
                                      "magnitude with --sparsity")
    sparsity: str | None = knob(None, recipe=False,
                                help="non-structured pruning: unstructured | N:M (N of every M input weights kept, e.g. 2:4); "
                                     "without it pruning is structured")
    ratio: float | None = knob(None, check=RATIO,
                               help="fraction removed per pruned layer, 0<R<1 (default 0.5): MLP channels, or weights with "
                                    "--sparsity unstructured; implied by N:M")
    attn_ratio: float | None = knob(None, check=ATTN_RATIO, help="fraction of KV groups removed (default: --ratio; 0 keeps attention)")
    layers: str | None = knob(None, help="START:END layers to prune (default: skip first 4 and last 2)")
    allocate: str = knob("uniform", choices=ALLOCATIONS,
                         help="structured: how the removed MLP channels spread over the layers: uniform (default: --ratio "
                              "in every layer) or global (the same total, the lowest-scored channels of the whole range, so "
                              "layers the scores find less important lose more; at most halfway from --ratio to all)")
    seed: int = knob(0, check=SEED)
    calib_data: str | None = knob(None, help=CALIB + ".txt, or .jsonl/.json of {text} rows or of "
                                  "training rows (rendered as `loram train` renders them; default: built-in text)")
    calib_samples: int = knob(8, check=COUNT, help=CALIB + "number of calibration sequences")
    calib_seq_len: int = knob(128, check=SEQ_LEN, help=CALIB + "tokens per calibration sequence")
    compensate: bool = knob(False, switch=True,
                            help="structured pruning: refit the kept input columns of o_proj / down_proj by least squares so each "
                                 "pruned layer reproduces the original's output on the calibration text (--calib-data, read "
                                 "for every method; streamed too: one original layer at a time); `loram build` cannot rebuild the folder")
    compensate_damp: float | None = knob(None, check=POSITIVE, metavar="D",
                                         help="--compensate: ridge weight towards the plain slice, relative to the mean input "
                                              "energy (default 1; smaller fits the calibration text closer: only with many "
                                              "more calibration tokens than MLP channels)")
    max_memory: float | None = max_memory_knob()
    precision: str = precision_knob()


@dataclass
class RecoverSettings:
    """``loram recover`` / a recipe's ``recover:``."""

    fill: str = knob("zero", choices=("zero", "normal"),
                     help="pruned columns of lora_A (o/down): zero (exact) or N(0,1/r) noise (the paper's normA)")
    seed: int = knob(0, check=SEED, help="seed for --fill normal")
    calibrate: str | None = knob(None, metavar="DATA",
                                 help="choose the scale s of the recovered update (lora_B x s, s in 0..1.2) that minimises the "
                                      "loss of a few in-domain rows on the original model (forward passes only); DATA as "
                                      "`loram train --data` takes it (a file, FILE[a:b], a folder or hub id)")
    calibrate_rows: int | None = knob(None, check=COUNT, metavar="N", help="--calibrate: rows used (default 32)")
    calibrate_scope: str | None = knob(None, choices=("global", "layer"),
                                       help="--calibrate: one s for the whole update (global, default) or one per decoder "
                                            "layer (layer: coordinate descent, 13 passes per layer)")
    calibrate_general: str | None = knob(None, metavar="GENERAL",
                                         help="--calibrate: keep only scales under which the perplexity of GENERAL's first "
                                              "rows (text the original should keep: general instructions, prose) stays at "
                                              "the base's (+ --calibrate-tolerance); the grid then runs on to s = 2.0")
    calibrate_tolerance: float | None = knob(None, check=NON_NEGATIVE, metavar="PCT",
                                             help="--calibrate-general: how many percent above the base's that perplexity "
                                                  "may rise (default 0)")
    calibrate_general_rows: int | None = knob(None, check=COUNT, metavar="N",
                                              help="--calibrate-general: rows used (default: --calibrate-rows); scored a "
                                                   "few times where DATA is scored 17 times, so more rows cost little")
    seq_len: int | None = knob(None, check=SEQ_LEN, help="--calibrate: rows are cut to this many tokens (default 512)")
    max_memory: float | None = knob(None, check=POSITIVE, metavar="GB", outcome=False,
                                    help="--calibrate: memory budget in GB (default: what the cgroup's limit leaves, else "
                                         "MemAvailable); an original whose in-memory evaluation does not fit is read layer by layer")


@dataclass
class MergeSettings:
    """``loram merge`` / a recipe's ``merge:`` (no recipe knobs: the recipe merges what it trained)."""

    keep_sparse: bool = knob(False, switch=True, recipe=False,
                             help="sparse plans: BASE is the sparse pruned folder and the update is masked to its non-zeros, "
                                  "so the merged model keeps its zeros (default: full update, as the paper)")
    max_memory: float | None = max_memory_knob()


@dataclass
class EvalSettings:
    """``loram eval`` / a recipe's ``eval:``. The command line names sets as repeated NAME=FILE, a recipe
    as a mapping; ``loram.eval.runner.EvalRequest`` takes (name, path) pairs."""

    # knob() returns a dataclasses.field (a default_factory for lists)
    ppl: list = knob([], repeat=True, metavar="NAME=FILE",  # noqa: RUF009
                     help="perplexity: .json/.jsonl instruction rows (response tokens) or .txt raw text; repeatable")
    seq_len: int = knob(1024, check=SEQ_LEN, help="ppl: window length for .txt / cut-off for rows")
    stride: int | None = knob(None, check=COUNT, help="ppl on .txt: window start every STRIDE tokens (default --seq-len)")
    mc: list = knob([], repeat=True, metavar="NAME=FILE",  # noqa: RUF009
                    help='multiple choice: .jsonl rows {"query","choices","gold"}; repeatable')
    shots: int = knob(0, check=Number(int, min=0), help="mc: few-shot examples per row")
    fewshot_file: str | None = knob(None, help="mc: pool of few-shot rows (default: the first --shots rows of the file)")
    gsm8k: str | None = knob(None, metavar="FILE", help="GSM8K jsonl (question, answer): exact match of the final number")
    humaneval: str | None = knob(None, metavar="FILE", help="HumanEval jsonl: pass@k, run in a sandboxed subprocess")
    samples: int = knob(1, check=COUNT, help="humaneval: completions per task (1 = greedy)")
    temperature: float = knob(0.8, check=POSITIVE, help="humaneval: sampling temperature when --samples > 1")
    timeout: float = knob(10.0, check=POSITIVE, help="humaneval: seconds per program")
    allow_unsandboxed_code: bool = knob(False, switch=True,
                                        help="humaneval: run generated code even where the namespace sandbox is unavailable (limits only)")
    limit: int | None = knob(None, check=COUNT, help="evaluate only the first N rows of each task")
    max_new_tokens: int | None = knob(None, check=COUNT, help="generation tasks (default gsm8k 256, humaneval 384)")
    lm_eval: str | None = knob(None, metavar="TASKS", help="comma list of lm-evaluation-harness tasks")
    lm_eval_include: str | None = knob(None, metavar="DIR", help="folder of local lm-eval task YAMLs")
    num_fewshot: int | None = knob(None, check=Number(int, min=0), help="lm-eval: few-shot examples")
    allow_code_execution: bool = knob(False, switch=True,
                                      help="lm-eval: run tasks marked unsafe (humaneval, mbpp): they execute the model's "
                                           "generated code on this machine, without loram's sandbox")
    batch_size: int = knob(8, check=COUNT)
    bf16: bool = knob(False, switch=True, recipe=False, help=BF16_HELP)
    precision: str = precision_knob()
    # `target`, not `on`: YAML 1.1 reads a bare `on:` key as True. None: merged if the recipe merges, else adapter
    target: str | None = knob(None, flag=False)
    max_memory: float | None = max_memory_knob()  # for load_for_eval, not the request

    def request_fields(self, ppl: list, mc: list) -> dict:
        """EvalRequest's keyword arguments, given the (name, path) pairs of ``ppl`` and ``mc``."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("bf16", "precision", "target", "max_memory")}
        tasks = [t.strip() for t in self.lm_eval.split(",") if t.strip()] if isinstance(self.lm_eval, str) else self.lm_eval
        return {**shared, "ppl": ppl, "mc": mc, "lm_eval": tasks or []}


# ---- train and align: knobs of TrainConfig / AlignConfig fields, keyed by field name -------------
def _run_knobs(lr: float) -> dict[str, Knob]:
    """Optimisation, checkpoint and eval knobs shared by `train` and `align` (in `--help` order)."""
    return {
        "lr": Knob(lr, check=POSITIVE),
        "schedule": Knob("cosine", help="cosine | linear | constant | constant_with_warmup"),
        "warmup": Knob(0.03, check=NON_NEGATIVE, help="fraction of steps (<1) or number of steps"),
        "steps": Knob(100, check=COUNT),
        "epochs": Knob(None, check=POSITIVE, help="train for epochs instead of --steps"),
        "micro_batch": Knob(4, check=COUNT, help="sequences per device per forward"),
        "grad_accum": Knob(1, check=COUNT, help="micro-batches per optimizer step"),
        "seq_len": Knob(512, check=SEQ_LEN),
        "grad_checkpointing": Knob(False, switch=True, help="recompute activations (less memory, ~30%% slower)"),
        "bf16": Knob(False, switch=True, help=BF16_HELP),
        "precision": PRECISION,
        "weight_decay": Knob(0.0, check=NON_NEGATIVE),
        "loss_chunk": Knob(0, check=COUNT_OR_OFF, metavar="N",
                           help="cross-entropy N positions at a time, never the full logits (same loss, less memory; "
                                "e.g. 128; 0: transformers' loss). Not with FSDP/DeepSpeed"),
        "seed": Knob(0, check=SEED),
        "save_steps": Knob(0, check=COUNT_OR_OFF, help="checkpoint every N steps (to OUT-checkpoints)"),
        # how a run is carried out, not what it trains: flags only (a recipe picks them itself)
        "checkpoint_dir": Knob(None, recipe=False, help="where checkpoints go (default OUT-checkpoints)"),
        "resume": Knob(False, switch=True, recipe=False, help="continue from the last complete checkpoint (exact)"),
        "logging_steps": Knob(10, check=COUNT),
        "eval": Knob([], repeat=True, metavar="NAME=FILE",
                     help="held-out set, perplexity (align --distill: and KL to the teacher) logged by name (repeatable)"),
        "eval_steps": Knob(0, check=Number(int, min=0, zero="0: at each checkpoint and at the end"),
                           help="evaluate every N steps (default: at each checkpoint, and at the end)"),
        "max_grad_norm": Knob(1.0, check=POSITIVE, flag=False),
        "report_to": Knob("none", metavar="TRACKER",
                          help="log losses and --eval perplexities to tensorboard, wandb or mlflow (comma list; default "
                               "none). TensorBoard files go to the checkpoint folder's runs/"),
    }


TRAIN_KNOBS = {
    "data": Knob(None, repeat=True, required=True,
                 help="FILE (.json/.jsonl/.parquet/.arrow/.csv/.tsv), dataset folder or hub id (streamed), optionally "
                      "FILE=WEIGHT for mixtures; repeatable. Rows: instruction/output, messages, prompt/completion, text"),
    "rank": Knob(8, check=COUNT),
    "alpha": Knob(16, check=COUNT),
    "dropout": Knob(0.05, check=DROPOUT),
    "targets": Knob("q,k,v,o,gate,up,down", help="comma list of q,k,v,o,gate,up,down,lm_head"),
    "quantize": Knob(None, choices=("nf4",), help="QLoRAM: NF4 + double quant base (needs bitsandbytes)"),
    "train_on_inputs": Knob(False, switch=True, help="loss on prompt tokens too"),
    "long_rows": Knob("truncate", choices=LONG_ROWS,
                      help="rows longer than --seq-len: truncate (keep the first --seq-len tokens, as TRL; default) or drop; "
                           "counted in the log and train_report.json"),
    "chat_template": Knob(None, metavar="FILE",
                          help="Jinja chat template file used instead of the tokenizer's (e.g. for a base model without one)"),
    "packing": Knob(False, switch=True, help="pack rows into --seq-len sequences, each row attending only to itself "
                                            "(positions restart per row; same loss as unpacked, fewer pad tokens)"),
    "original_offset": Knob(False, switch=True,
                            help="pruned model: train the update as it acts on the original, scoring the student through "
                                 "log p_original - log p_pruned (the original's top-k computed once before training, "
                                 "cached, streamed when it does not fit --max-memory), so the adapter does not learn to "
                                 "repair the pruning"),
    "teacher": Knob(None, metavar="PATH|HUB_ID", help="--original-offset: the original model (default: the plan's base; its "
                                                      "fingerprint must be the plan's)"),
    "offset_top_k": Knob(32, check=COUNT, metavar="K", help="--original-offset: the original's tokens kept per position "
                                                           "(default 32; the vocabulary size: exact)"),
    "offset_cache": Knob(None, metavar="DIR", outcome=False,
                         help="--original-offset: folder of the original's cached top-k (default CHECKPOINT_DIR/teacher-topk); "
                              "reused when it holds the same original, examples and K"),
    "offset_at": Knob("logits", choices=("logits", "layers"),
                      help="--original-offset: where the pruned model is moved to the original: at its output (logits: "
                           "the original's top-k, default) or after every decoder layer (layers: the update then reads the "
                           "original's activations; the original's per-layer corrections computed once, L x d per token)"),
    "max_memory": Knob(None, check=POSITIVE, metavar="GB", outcome=False,
                       help="--original-offset: memory budget of the original's pass (default: what the cgroup's limit "
                            "leaves, else MemAvailable); an original whose in-memory pass does not fit is read layer by layer"),
    "anchor": Knob(None, metavar="TEXT",
                   help="general text (as `loram align --data`: .txt lines or `text` rows, folder or hub id; or training rows such "
                        "as general instructions, rendered as `loram train` renders them) on which the update "
                        "should change nothing: the loss adds --anchor-weight x KL(adapter off || adapter on) on its "
                        "--seq-len blocks, keeping the model's general-text behaviour (loram.anchor)"),
    "anchor_weight": Knob(1.0, check=NON_NEGATIVE, metavar="W", help="--anchor: weight of the KL term (default 1)"),
    "anchor_batch": Knob(1, check=COUNT, metavar="N", help="--anchor: blocks read per micro-step (default 1)"),
    **_run_knobs(lr=2e-4),
}
ALIGN_KNOBS = {
    "data": Knob(None, repeat=True, required=True,
                 help="corpus: .txt (one document per line), .jsonl/.json/.parquet/.arrow/.csv/.tsv with `text`, or a "
                      "dataset folder / hub id (streamed); FILE=WEIGHT mixes"),
    "tokens": Knob(None, check=COUNT, help="token budget (sets --steps from batch and sequence length)"),
    "train_embeddings": Knob(False, switch=True, help="also train embed_tokens (frozen by default)"),
    "train_lm_head": Knob(False, switch=True, help="also train lm_head (frozen by default, as the paper)"),
    "distill": Knob(False, switch=True,
                    help="align to the original model's next-token distribution (KL on its top-k, computed once before "
                         "training, cached on disk, streamed when the original does not fit --max-memory) instead of "
                         "the plain LM loss"),
    "teacher": Knob(None, metavar="PATH|HUB_ID", help="--distill: the original model (default: the plan's base; its "
                                                      "fingerprint must be the plan's)"),
    "distill_top_k": Knob(32, check=COUNT, metavar="K", help="--distill: teacher tokens kept per position (default 32)"),
    "distill_lm_weight": Knob(0.0, check=NON_NEGATIVE, metavar="W",
                              help="--distill: loss = KL + W x LM loss (default 0: pure KL, as Minitron)"),
    "distill_temperature": Knob(1.0, check=POSITIVE, metavar="T", help="--distill: softmax temperature of both models "
                                                                        "(KL x T^2; default 1)"),
    "distill_cache": Knob(None, metavar="DIR", outcome=False,
                          help="--distill: folder of the teacher's cached top-k (default CHECKPOINT_DIR/teacher-topk); "
                               "reused when it holds the same teacher, data and K"),
    "max_memory": Knob(None, check=POSITIVE, metavar="GB", outcome=False,
                       help="--distill: memory budget of the teacher pass (default: what the cgroup's limit leaves, else "
                            "MemAvailable); a teacher whose in-memory pass does not fit is read layer by layer"),
    **_run_knobs(lr=2e-5),
}
RECORDS = {"prune": PruneSettings, "recover": RecoverSettings, "merge": MergeSettings, "eval": EvalSettings}


def knobs(stage: str) -> dict[str, Knob]:
    """name -> Knob of a stage, in flag order."""
    if stage == "train":
        return TRAIN_KNOBS
    if stage == "align":
        return ALIGN_KNOBS
    out = {}
    for f in fields(RECORDS[stage]):
        out[f.name] = replace(f.metadata["knob"], default=f.default_factory() if f.default is MISSING else f.default)
    return out


def recipe_keys(stage: str) -> set[str]:
    """The knobs a recipe's section for ``stage`` may set."""
    return {n for n, k in knobs(stage).items() if k.recipe}


def outcome_values(stage: str, cfg: dict) -> dict:
    """``cfg`` without the knobs that do not change what the stage writes (Knob.outcome False): what the
    recipe hashes."""
    table = knobs(stage)
    return {n: v for n, v in cfg.items() if n not in table or table[n].outcome}


def record_class(stage: str):
    return {"train": TrainConfig, "align": AlignConfig}.get(stage) or RECORDS[stage]


# ---- the command line ----------------------------------------------------------------------------
def add_flags(parser, stage: str) -> None:
    """Add a stage's flags to its verb's parser (help, default, validator, choices from the knobs)."""
    for name, k in knobs(stage).items():
        if k.flag:
            add_flag(parser, name, k)


def add_precision(parser) -> None:
    """--precision on a verb without a settings record (generate, plan): the same knob as the stages'."""
    add_flag(parser, "precision", PRECISION)


def add_flag(parser, name: str, k: Knob) -> None:
    """One knob's flag."""
    kw = {"default": k.default, "help": k.help}
    if k.switch:
        kw["action"] = "store_true"
    if k.repeat:
        kw["action"] = "append"
    kw.update({a: v for a, v in (("type", k.check), ("choices", k.choices), ("metavar", k.metavar)) if v is not None})
    if k.required:
        kw["required"] = True
    parser.add_argument(flag_name(name), **kw)


def from_args(stage: str, args):
    """The stage's record from parsed flags."""
    return record(stage, {n: getattr(args, n) for n, k in knobs(stage).items() if k.flag})


def argv(stage: str, values: dict) -> list[str]:
    """The flags (tokens) that give ``values``: the command a recipe stage or the demo corresponds to."""
    out = []
    for name, v in values.items():
        flag = flag_name(name)
        if isinstance(v, bool):
            out += [flag] if v else []
        elif isinstance(v, list):
            out += [t for x in v for t in (flag, str(x))]
        elif isinstance(v, dict):
            out += [t for n, x in v.items() for t in (flag, f"{n}={x}")]
        else:
            out += [flag, str(v)]
    return out


# ---- records from flag or recipe values ------------------------------------------------------------
def data_source(spec: str) -> tuple[str, str | None]:
    """``FILE[=WEIGHT]`` -> (FILE, WEIGHT text or None). A spec naming an existing file is that file, so a
    file whose name contains '=' still works."""
    f, eq, w = spec.rpartition("=")
    return (f, w) if eq and f and not Path(spec).exists() else (spec, None)


def parse_data(specs: list[str]) -> tuple[list[str], list[float] | None]:
    """``--data FILE[=WEIGHT]`` entries -> (files, weights or None); every entry weighted or none."""
    files, weights = [], []
    for s in specs:
        f, w = data_source(s)
        files.append(f)
        weights.append(None if w is None else POSITIVE.named(f"--data {f} mixture weight")(w))  # finite, > 0
    if all(w is None for w in weights):
        return files, None
    if any(w is None for w in weights):
        raise LoramError("give a mixture weight to every --data (FILE=WEIGHT) or to none")
    return files, weights


def parse_evals(specs: list[str]) -> dict[str, str]:
    """``--eval NAME=FILE`` entries -> {name: file}."""
    out = {}
    for s in specs:
        name, eq, f = s.partition("=")
        if not eq or not name or not f:
            raise LoramError(f"--eval {s!r} is not NAME=FILE: e.g. --eval alpaca=held_out.json")
        if name in out:
            raise LoramError(f"--eval name {name!r} given twice: give each held-out set its own name")
        out[name] = f
    return out


def record(stage: str, values: dict):
    """The stage's record from knob values as flags give them or as a (checked) recipe section holds them.

    Train/align: ``data`` is a list of FILE[=WEIGHT] specs, ``eval`` NAME=FILE specs (flags) or a
    mapping (recipe), ``targets`` comma text or a list. Knobs that are not record fields (--resume)
    are left to the caller."""
    cls = record_class(stage)
    names = {f.name for f in fields(cls)}
    v = {k: x for k, x in values.items() if k in names}
    if stage in ("train", "align"):
        v["data"], v["data_weights"] = parse_data(v["data"])
        if isinstance(v.get("eval"), list):
            v["eval"] = parse_evals(v["eval"])
        if "targets" in v:
            t = v["targets"]
            v["targets"] = tuple(x.strip() for x in (t.split(",") if isinstance(t, str) else t) if x.strip())
    try:  # a recipe's knobs were checked by check_recipe_section; this catches what only the record knows
        return cls(**v)
    except TypeError as e:
        raise LoramError(f"recipe {stage}: {e}") from None


# ---- a recipe section ------------------------------------------------------------------------------
def check_recipe_section(stage: str, cfg: dict) -> dict:
    """``cfg`` with every knob checked by its flag's validator; quoted numbers become numbers.
    Unknown knobs are refused by the caller (it names the recipe)."""
    table = knobs(stage)
    out = dict(cfg)
    for name, v in cfg.items():
        where, k = f"{stage}.{name}", table[name]
        if v is None:
            if k.flag and k.default is not None:
                raise LoramError(f"{where} is empty: give a value or delete the line (default {k.default})")
        elif k.check is not None:
            parsed = k.check.named(where).value(v)
            out[name] = parsed if isinstance(v, str) else v  # numbers as written: the stage hash stays the same
        elif k.switch and not isinstance(v, bool):
            raise LoramError(f"{where} = {v!r} is not a boolean: write true or false")
        elif k.choices is not None and v not in k.choices:
            raise LoramError(f"{where} = {v!r} is not one of {', '.join(map(str, k.choices))}: pick one")
    if stage == "prune" and cfg.get("layers") is not None and not isinstance(cfg["layers"], str):
        raise LoramError(f"prune.layers {cfg['layers']!r} is not START:END text: write e.g. layers: \"4:28\"")
    if stage == "eval" and cfg.get("target", "merged") not in EVAL_TARGETS:
        raise LoramError(f"eval.target {cfg['target']!r} is unknown: use {', '.join(EVAL_TARGETS)}")
    return out


# ---- library checks: Python callers get the CLI's ranges and messages ----------------------------
def check_knobs(verb: str, **values) -> None:
    """Library check of keyword arguments named like the knobs of stage ``verb`` (loram.settings), by
    their validators (None: the default). Python callers get the CLI's ranges and messages."""
    table = knobs(verb)
    for k, v in values.items():
        if k in table and table[k].flag and table[k].check is not None and v is not None:
            table[k].checker(k).check(v)


def refuse_without(cfg, names: tuple[str, ...], switch: str, add: str) -> None:
    """Refuse knobs ``names`` of a config dataclass set away from their defaults while the option they belong to
    (``switch``, e.g. --anchor) is off: one line naming the flag and the two fixes (``add`` it, or drop the flag)."""
    defaults = {f.name: f.default for f in fields(cfg)}
    given = [flag_name(n) for n in names if getattr(cfg, n) != defaults[n]]
    if given:
        raise LoramError(f"{given[0]} only applies with {switch}: add {add} or drop {given[0]}")


def check_config(cfg, verb: str) -> None:
    """check_knobs on a config dataclass (TrainConfig, AlignConfig, EvalRequest) before anything is loaded,
    plus what has no flag: mixture weights and knobs such as max_grad_norm > 0."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    check_knobs(verb, **values)
    if "precision" in values:
        precision_of(values["precision"], values.get("bf16", False))
    for w in getattr(cfg, "data_weights", None) or []:
        POSITIVE.named("mixture weight").check(w)
    for name, k in knobs(verb).items():
        if not k.flag and k.check is not None and name in values:
            k.checker(name).check(values[name])
