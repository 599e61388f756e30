"""`loram run RECIPE.yaml`: prune -> align (optional) -> train -> recover -> merge -> eval from one file.

A recipe (YAML, read with yaml.safe_load) names the base model, a work folder and one mapping per
stage, with the same knobs as the stage's command (underscores for dashes):

    base: smollm2                       # folder, .gguf, hub id or alias
    workdir: runs/smollm2-loram         # stage outputs: pruned/ aligned/ adapter/ recovered/ merged/ eval/
    prune:   {method: taylor, ratio: 0.5, layers: "4:28"}
    align:   {data: [corpus.txt=1.0], steps: 200, seq_len: 256}      # optional
    train:   {data: [a.json=0.7, b.json=0.3], eval: {alpaca: c.json}, steps: 60}
    recover: {fill: zero}               # runs whenever prune does
    merge:   {}                         # optional
    eval:    {ppl: {alpaca: c.json}, mc: {arc: arc.jsonl}, limit: 100}   # optional, needs loram.eval

Relative paths are taken from the current directory. A stage is skipped when its output exists
and its ``loram_stage.json`` holds the same hash, where

    hash(stage) = sha256(json({stage, config, hash of the stage it reads}))

so changing a knob re-runs that stage and everything after it. A train stage whose checkpoints
carry the same hash resumes from them (a killed recipe continues where it stopped).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import LoramError

STAGES = ("prune", "align", "train", "recover", "merge", "eval")
OUTPUT = {"prune": "pruned", "align": "aligned", "train": "adapter", "recover": "recovered", "merge": "merged", "eval": "eval"}
STAGE_FILE = "loram_stage.json"
PRUNE_KEYS = {"method", "ratio", "attn_ratio", "layers", "seed", "calib_data", "calib_samples", "calib_seq_len"}
RECOVER_KEYS = {"fill", "seed"}
MERGE_KEYS: set[str] = set()
EVAL_KEYS = {"ppl", "mc", "shots", "fewshot_file", "gsm8k", "humaneval", "samples", "temperature", "timeout", "limit",
             "max_new_tokens", "seq_len", "stride", "lm_eval", "lm_eval_include", "num_fewshot", "batch_size", "target"}
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


@dataclass
class Step:
    stage: str
    config: dict
    out: Path
    input_hash: str
    hash: str = ""
    status: str = ""  # run | skip (up to date) | rerun (config changed)
    command: str = ""


@dataclass
class Recipe:
    path: Path
    base: str
    workdir: Path
    stages: dict[str, dict] = field(default_factory=dict)


def _keys_of(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _allowed(stage: str) -> set[str]:
    from .align import AlignConfig
    from .train import TrainConfig

    return {"prune": PRUNE_KEYS, "align": _keys_of(AlignConfig) - {"data_weights"},
            "train": _keys_of(TrainConfig) - {"data_weights", "extra"}, "recover": RECOVER_KEYS, "merge": MERGE_KEYS,
            "eval": EVAL_KEYS}[stage]


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LoramError(f"recipe {p} does not exist: check the path")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise LoramError(f"recipe {p} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(doc, dict):
        raise LoramError(f"recipe {p} is not a mapping: give base, workdir and one section per stage")
    unknown = set(doc) - {"base", "workdir", "name", *STAGES}
    if unknown:
        raise LoramError(f"recipe {p}: unknown section(s) {sorted(unknown)}: use base, workdir, {', '.join(STAGES)}")
    for k in ("base", "workdir", "train"):
        if k not in doc:
            raise LoramError(f"recipe {p} has no `{k}`: every recipe needs base, workdir and train")
    stages = {}
    for s in STAGES:
        if s not in doc:
            continue
        cfg = doc[s] or {}
        if not isinstance(cfg, dict):
            raise LoramError(f"recipe {p}: `{s}` must be a mapping of knobs (or {{}})")
        bad = set(cfg) - _allowed(s)
        if bad:
            raise LoramError(f"recipe {p}: unknown {s} knob(s) {sorted(bad)}: allowed {', '.join(sorted(_allowed(s)))}")
        stages[s] = cfg
    if "align" in stages and "prune" not in stages:
        raise LoramError(f"recipe {p}: align needs a prune section (it aligns the pruned model)")
    if "prune" in stages:
        stages.setdefault("recover", {})
    return Recipe(p, str(doc["base"]), Path(str(doc["workdir"])), stages)


def _hash(stage: str, cfg: dict, upstream: str) -> str:
    blob = json.dumps({"stage": stage, "config": cfg, "input": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stored_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text()).get("hash")
    except (OSError, ValueError):
        return None


def _status(out: Path, h: str) -> str:
    if not out.exists():
        return "run"
    return "skip" if stored_hash(out) == h else "rerun"


def _data_list(spec, stage: str) -> list[str]:
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list) or not spec:
        raise LoramError(f"{stage}.data must be a list of FILE or FILE=WEIGHT entries")
    out = []
    for d in spec:
        if isinstance(d, dict) and "path" in d:
            d = f"{d['path']}={d['weight']}" if "weight" in d else str(d["path"])
        out.append(str(d))
    return out


def _check_local(spec: str, what: str) -> None:
    """A path that looks local must exist; hub ids are checked when the stage runs."""
    from .data import split_slice

    path, _ = split_slice(spec.rpartition("=")[0] if "=" in spec and not Path(spec).exists() else spec)
    if (path.endswith(DATA_SUFFIXES) or path.startswith((".", "/"))) and not Path(path).exists():
        raise LoramError(f"{what}: data file {path} does not exist: fix the path (relative paths start at the current directory)")


def stage_configs(r: Recipe):
    """Typed configs of the train/align stages (validates every knob's type and value)."""
    from .align import AlignConfig
    from .cli.train import parse_data
    from .train import TrainConfig

    out = {}
    for s, cls in (("align", AlignConfig), ("train", TrainConfig)):
        if s not in r.stages:
            continue
        cfg = dict(r.stages[s])
        files, weights = parse_data(_data_list(cfg.pop("data", None), s))
        for f in _data_list(r.stages[s]["data"], s):
            _check_local(f, f"recipe {s}")
        for name, f in (cfg.get("eval") or {}).items():
            _check_local(str(f), f"recipe {s}.eval {name}")
        if "targets" in cfg:
            t = cfg["targets"]
            cfg["targets"] = tuple(x.strip() for x in (t.split(",") if isinstance(t, str) else t))
        try:
            c = cls(data=files, data_weights=weights, **cfg)
        except TypeError as e:
            raise LoramError(f"recipe {s}: {e}") from None
        for k, v in cfg.items():  # YAML gives strings for "1e-4": catch wrong types here, not mid-run
            want = type(getattr(cls(data=[]), k))
            if want in (int, float) and not isinstance(v, (int, float)) or want is bool and not isinstance(v, bool):
                raise LoramError(f"recipe {s}.{k} = {v!r} is not a {want.__name__}: write a plain number/boolean (e.g. 1.0e-4)")
        out[s] = c
    if "prune" in r.stages:
        from .prune import check_ratio

        pc = r.stages["prune"]
        check_ratio("prune.ratio", float(pc.get("ratio", 0.5)), allow_zero=False)
        if pc.get("attn_ratio") is not None:
            check_ratio("prune.attn_ratio", float(pc["attn_ratio"]), allow_zero=True)
    if "recover" in r.stages and r.stages["recover"].get("fill", "zero") not in ("zero", "normal"):
        raise LoramError("recipe recover.fill must be zero or normal")
    for name, f in list((r.stages.get("eval") or {}).get("ppl", {}).items()) + list((r.stages.get("eval") or {}).get("mc", {}).items()):
        _check_local(str(f), f"recipe eval {name}")
    return out


def plan_steps(r: Recipe) -> list[Step]:
    """The stages to run, in order, with their hashes and status."""
    steps, upstream, model = [], _hash("base", {"base": r.base}, ""), r.base
    train_in = upstream
    cmd = {
        "prune": lambda c: f"loram prune {r.base} -o {r.workdir / 'pruned'} " + _flags(c),
        "align": lambda c: f"loram align {r.workdir / 'pruned'} -o {r.workdir / 'aligned'} " + _flags(c),
        "train": lambda c: f"loram train {model} -o {r.workdir / 'adapter'} " + _flags(c),
        "recover": lambda c: f"loram recover {r.workdir / 'adapter'} --base {r.base} -o {r.workdir / 'recovered'} " + _flags(c),
        "merge": lambda c: f"loram merge {r.base} {adapter_for_merge} -o {r.workdir / 'merged'}",
        "eval": lambda c: "loram eval ... " + _flags(c),
    }
    adapter_for_merge = r.workdir / ("recovered" if "prune" in r.stages else "adapter")
    for s in STAGES:
        if s not in r.stages:
            continue
        cfg = r.stages[s]
        inp = train_in if s == "train" else upstream
        if s == "recover":
            inp = _hash("recover-input", {"base": r.base}, upstream)
        st = Step(s, cfg, r.workdir / OUTPUT[s], inp)
        st.hash = _hash(s, cfg, inp)
        st.status = _status(st.out, st.hash)
        st.command = cmd[s](cfg).strip()
        steps.append(st)
        upstream = st.hash
        if s in ("prune", "align"):
            train_in, model = st.hash, r.workdir / OUTPUT[s]
    # a re-run stage invalidates everything after it even if the files look current
    dirty = False
    for st in steps:
        if dirty and st.status == "skip":
            st.status = "rerun"
        dirty = dirty or st.status != "skip"
    return steps


def _flags(cfg: dict) -> str:
    parts = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts += [flag] if v else []
        elif isinstance(v, list):
            parts += [f"{flag} {x}" for x in v]
        elif isinstance(v, dict):
            parts += [f"{flag} {n}={x}" for n, x in v.items()]
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def config_summary(base: str) -> str:
    """One line on the base model's config, read without downloading weights (or why not)."""
    try:
        from .families import geometry
        from .io import resolve_model

        path, _ = resolve_model(base)
        if Path(path).exists():
            from .io import load_config

            cfg = load_config(base)
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        g = geometry(cfg)
        return f"{g.n_layers} layers, hidden {g.hidden}, MLP {g.intermediate}, {g.n_heads} heads / {g.n_kv_heads} KV heads"
    except Exception as e:  # noqa: BLE001 - offline hub id: structure-only validation
        return f"config not available offline ({type(e).__name__}): structure validated only"


def _write_stage(out: Path, st: Step) -> None:
    (out / STAGE_FILE).write_text(json.dumps({"stage": st.stage, "hash": st.hash, "config": st.config}, indent=2, default=str) + "\n")


def run_recipe(path: str | Path, dry_run: bool = False, echo=print) -> list[Step]:
    r = load_recipe(path)
    typed = stage_configs(r)
    steps = plan_steps(r)
    echo(f"recipe {r.path}: base {r.base} ({config_summary(r.base) if dry_run else 'checked when loaded'}), workdir {r.workdir}")
    for st in steps:
        echo(f"  {st.stage:8s} {st.status:6s} -> {st.out}    ({st.command})")
    if dry_run:
        return steps
    r.workdir.mkdir(parents=True, exist_ok=True)
    for k, st in enumerate(steps, 1):
        if st.status == "skip":
            echo(f"[{st.stage}] up to date, skipped ({st.out})")
            continue
        echo(f"[{st.stage}] stage {k}/{len(steps)} running: {st.command}")  # then the stage's own bars
        _run_stage(r, st, typed)
    return steps


def _run_stage(r: Recipe, st: Step, typed: dict) -> None:
    c, w = st.config, r.workdir
    if st.stage == "prune":
        from .prune import prune

        prune(r.base, st.out, overwrite=True, **c)
    elif st.stage == "align":
        from .align import align

        align(w / "pruned", st.out, typed["align"], **_resume_args(st))
    elif st.stage == "train":
        from .train import train

        model = w / "aligned" if "align" in r.stages else w / "pruned" if "prune" in r.stages else r.base
        train(model, st.out, typed["train"], **_resume_args(st))
    elif st.stage == "recover":
        from .recover import recover

        recover(w / "adapter", r.base, st.out, overwrite=True, **c)
    elif st.stage == "merge":
        from .merge import merge

        merge(r.base, w / ("recovered" if "prune" in r.stages else "adapter"), st.out, overwrite=True)
    elif st.stage == "eval":
        if not _run_eval(r, st):
            return
    _write_stage(st.out, st)


def _resume_args(st: Step) -> dict:
    """Resume from this stage's checkpoints when they come from the same config, else start clean."""
    from .train import last_checkpoint

    ckpt = Path(f"{st.out}-checkpoints")
    same = stored_hash(ckpt) == st.hash and last_checkpoint(ckpt) is not None
    if not same and ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    _write_stage(ckpt, st)
    return {"resume": same, "overwrite": True}


def _run_eval(r: Recipe, st: Step) -> bool:
    """Evaluate with loram.eval when it is installed; otherwise say so and skip."""
    try:
        from .eval import load_for_eval
        from .eval.runner import EvalRequest, run_tasks
    except ImportError:
        print(f"[eval] skipped: loram.eval is not available in this install ({st.out} not written)")
        return False
    from dataclasses import asdict

    from .io import atomic_dir, write_json

    c = dict(st.config)
    # `target`, not `on`: YAML 1.1 reads a bare `on:` key as True
    on = c.pop("target", "merged" if "merge" in r.stages else "adapter")
    c["ppl"] = [(n, Path(f)) for n, f in (c.get("ppl") or {}).items()]
    c["mc"] = [(n, Path(f)) for n, f in (c.get("mc") or {}).items()]
    if isinstance(c.get("lm_eval"), str):
        c["lm_eval"] = [t.strip() for t in c["lm_eval"].split(",") if t.strip()]
    req = EvalRequest(**c)
    if on == "merged":
        model, tok = load_for_eval(str(r.workdir / "merged"))
    elif on == "adapter":
        model, tok = load_for_eval(r.base, str(r.workdir / ("recovered" if "prune" in r.stages else "adapter")))
    elif on == "base":
        model, tok = load_for_eval(r.base)
    else:
        raise LoramError(f"recipe eval.target {on!r} is unknown: use merged, adapter or base")
    results = run_tasks(model, tok, req)
    for x in results:
        print(f"[eval] {x.task} {x.metric} {x.value:.4f} (n={x.n})")
    with atomic_dir(st.out, overwrite=True) as tmp:
        write_json(Path(tmp) / "results.json", {"on": on, "results": [asdict(x) for x in results]})
    return True
