"""`loram run RECIPE.yaml`: prune -> align (optional) -> train -> recover -> merge -> eval from one file.

A recipe (YAML, read by a bounded safe loader: ``read_yaml``) names the base model, a work folder
and one mapping per stage, with the same knobs as the stage's command (underscores for dashes):

    base: smollm2                       # folder, .gguf, hub id or alias
    workdir: runs/smollm2-loram         # stage outputs: pruned/ aligned/ adapter/ recovered/ merged/ eval/
    prune:   {method: taylor, ratio: 0.5, layers: "4:28"}
    align:   {data: [corpus.txt=1.0], steps: 200, seq_len: 256}      # optional
    train:   {data: [a.json=0.7, b.json=0.3], eval: {alpaca: c.json}, steps: 60}
    recover: {fill: zero}               # runs whenever prune does
    merge:   {}                         # optional
    eval:    {ppl: {alpaca: c.json}, mc: {arc: arc.jsonl}, limit: 100}   # optional, needs loram.eval

Any knob can be overridden on the command line with its dotted name, read as YAML reads it
(``loram run R.yaml train.lr=2e-4 prune.ratio=0.65``): the recipe is the file plus the overrides,
so the stage hashes see the overridden values and the changed stages re-run.

Relative paths are taken from the current directory. A stage is skipped when its output exists
and its ``loram_stage.json`` holds the same hash, where

    hash(stage) = sha256(json({stage, config, hash of the stage it reads}))

so changing a knob re-runs that stage and everything after it. A train stage whose checkpoints
carry the same hash resumes from them (a killed recipe continues where it stopped).

Each section is the stage's settings record (``loram.settings``), the one its command's flags come
from: the same names, and every knob checked by the same validator (``loram train --lr`` checks
``train.lr``): the same types and ranges, a quoted number read as the flag reads its text
(``ratio: "0.5"`` is 0.5), and ``--dry-run`` runs exactly the checks of a real run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import settings
from .align import align
from .data import FILE_SUFFIXES, missing_local_file, read_chat_template, split_slice
from .errors import LoramError
from .io import _local_inputs, _real, atomic_dir, check_replace, lock_output, unlock_output, write_json, write_marker
from .merge import merge
from .prune import check_method, prune
from .prune_plan import parse_layers
from .recover import recover
from .settings import STAGES, data_source
from .train import train
from .training import last_checkpoint
from .yamlfile import apply_overrides, read_yaml

OUTPUT = {"prune": "pruned", "align": "aligned", "train": "adapter", "recover": "recovered", "merge": "merged", "eval": "eval"}
STAGE_FILE = "loram_stage.json"
DATA_SUFFIXES = (*FILE_SUFFIXES, ".txt")


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


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """The recipe in ``path`` with ``overrides`` (``train.lr=2e-4``: yamlfile.apply_overrides) applied, checked."""
    p = Path(path)
    if not p.is_file():
        raise LoramError(f"recipe {p} does not exist: check the path")
    doc = read_yaml(p)
    if overrides and isinstance(doc, dict):
        doc = apply_overrides(doc, overrides)
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
        allowed = settings.recipe_keys(s)  # the stage's settings record: the same names as its flags
        bad = set(cfg) - allowed
        if bad:
            raise LoramError(f"recipe {p}: unknown {s} knob(s) {sorted(bad)}: allowed {', '.join(sorted(allowed))}")
        try:
            stages[s] = settings.check_recipe_section(s, cfg)
        except LoramError as e:
            raise LoramError(f"recipe {p}: {e}") from None
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
    path, _ = split_slice(data_source(spec)[0])
    if missing_local_file(path, DATA_SUFFIXES):
        raise LoramError(f"{what}: data file {path} does not exist: fix the path (relative paths start at the current directory)")


def stage_configs(r: Recipe) -> dict:
    """Each stage's settings record (validates what only the record knows; local data files exist)."""
    out = {}
    for s in r.stages:
        cfg = dict(r.stages[s])
        if s in ("align", "train"):
            cfg["data"] = _data_list(cfg.get("data"), s)
        out[s] = settings.record(s, cfg)  # mixture weights are checked here, before the files
        if s in ("align", "train"):
            for f in cfg["data"]:
                _check_local(f, f"recipe {s}")
            for name, f in (cfg.get("eval") or {}).items():
                _check_local(str(f), f"recipe {s}.eval {name}")
        if cfg.get("chat_template"):  # before any stage runs: not after a prune of many minutes
            read_chat_template(cfg["chat_template"])
    for name, f in list((r.stages.get("eval") or {}).get("ppl", {}).items()) + list((r.stages.get("eval") or {}).get("mc", {}).items()):
        _check_local(str(f), f"recipe eval {name}")
    return out


def stage_steps(r: Recipe) -> list[Step]:
    """The stages to run, in order, with their hashes and status."""
    steps, upstream, model = [], _hash("base", {"base": r.base}, ""), r.base
    train_in = upstream
    cmd = {  # the command each stage corresponds to, shown by the dry run
        "prune": lambda: f"loram prune {r.base} -o {r.workdir / 'pruned'}",
        "align": lambda: f"loram align {r.workdir / 'pruned'} -o {r.workdir / 'aligned'}",
        "train": lambda: f"loram train {model} -o {r.workdir / 'adapter'}",
        "recover": lambda: f"loram recover {r.workdir / 'adapter'} --base {r.base} -o {r.workdir / 'recovered'}",
        "merge": lambda: f"loram merge {r.base} {adapter_for_merge} -o {r.workdir / 'merged'}",
        "eval": lambda: "loram eval ...",
    }
    adapter_for_merge = _adapter(r)
    for s in STAGES:
        if s not in r.stages:
            continue
        cfg = r.stages[s]
        inp = train_in if s == "train" else upstream
        if s == "recover":
            inp = _hash("recover-input", {"base": r.base}, upstream)
        st = Step(s, cfg, r.workdir / OUTPUT[s], inp)
        st.hash = _hash(s, settings.outcome_values(s, cfg), inp)  # a memory budget changes how, not what
        st.status = _status(st.out, st.hash)
        st.command = " ".join([cmd[s](), *settings.argv(s, cfg)])
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


def base_geometry(base: str):
    """(Geometry of the base model's config, read without downloading anything, or None; why not)."""
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
        return geometry(cfg), ""
    except Exception as e:  # noqa: BLE001 - offline hub id: structure-only validation
        return None, type(e).__name__


def config_summary(base: str) -> str:
    """One line on the base model's config, read without downloading weights (or why not)."""
    g, why = base_geometry(base)
    if g is None:
        return f"config not available offline ({why}): structure validated only"
    return f"{g.n_layers} layers, hidden {g.hidden}, MLP {g.intermediate}, {g.n_heads} heads / {g.n_kv_heads} KV heads"


def check_prune_against_base(r: Recipe) -> None:
    """prune.method, and prune.layers against the base's config when it is readable offline (`loram prune`
    checks them first too)."""
    if "prune" in r.stages:
        try:
            check_method(r.stages["prune"].get("method") or "taylor")
        except LoramError as e:
            raise LoramError(f"recipe {r.path}: prune.method: {e}") from None
    g = base_geometry(r.base)[0] if "prune" in r.stages else None
    if g is None:
        return

    try:
        parse_layers(r.stages["prune"].get("layers"), g.n_layers)
    except LoramError as e:
        raise LoramError(f"recipe {r.path}: prune.layers: {e}") from None


def _write_stage(out: Path, st: Step) -> None:
    (out / STAGE_FILE).write_text(json.dumps({"stage": st.stage, "hash": st.hash, "config": st.config}, indent=2, default=str) + "\n")


def run_recipe(path: str | Path, dry_run: bool = False, echo=print, overrides: list[str] | tuple = ()) -> list[Step]:
    r = load_recipe(path, overrides)
    typed = stage_configs(r)
    check_prune_against_base(r)  # the checks `loram prune` makes first, so --dry-run catches them too
    steps = stage_steps(r)
    echo(f"recipe {r.path}: base {r.base} ({config_summary(r.base) if dry_run else 'checked when loaded'}), workdir {r.workdir}")
    for st in steps:
        echo(f"  {st.stage:8s} {st.status:6s} -> {st.out}    ({st.command})")
    check_ownership(r, steps)
    if dry_run:
        return steps

    lock_output(r.workdir, "workdir")  # one recipe per workdir at a time
    try:
        check_ownership(r, steps)  # again under the lock: another run may have written meanwhile
        r.workdir.mkdir(parents=True, exist_ok=True)
        for k, st in enumerate(steps, 1):
            if st.status == "skip":
                echo(f"[{st.stage}] up to date, skipped ({st.out})")
                continue
            echo(f"[{st.stage}] stage {k}/{len(steps)} running: {st.command}")  # then the stage's own bars
            _run_stage(r, st, typed)
    finally:
        unlock_output(r.workdir)
    return steps


def recipe_inputs(r: Recipe) -> list[str]:
    """The local files and folders a recipe reads (base model, data, eval, calibration and anchor files)."""
    found = [r.base]
    for s, cfg in r.stages.items():
        if cfg.get("data") is not None:
            found += [data_source(d)[0] for d in _data_list(cfg["data"], s)]
        for key in ("eval", "ppl", "mc"):
            if isinstance(cfg.get(key), dict):
                found += [str(f) for f in cfg[key].values()]
        found += [str(cfg[k]) for k in ("calib_data", "fewshot_file", "chat_template", "anchor", "calibrate", "calibrate_general")
                  if cfg.get(k)]
    return found


def check_ownership(r: Recipe, steps: list[Step]) -> None:
    """Before any stage runs: a recipe replaces only the stage outputs (and checkpoints) it wrote."""

    wd = _real(r.workdir)
    if wd == Path("/") or wd == _real(Path.home()):
        raise LoramError(f"recipe workdir {r.workdir} is {'/' if wd == Path('/') else 'your home folder'}: "
                         "give the recipe a folder of its own, e.g. runs/NAME")
    inputs = recipe_inputs(r)
    for i in _local_inputs(inputs):
        if wd == _real(i) or wd in _real(i).parents:
            raise LoramError(f"recipe workdir {r.workdir} contains the input {i}: give the recipe a folder of its own "
                             "(e.g. runs/NAME), away from its model and data")
    for st in steps:
        if st.status == "skip":
            continue
        folders = [st.out] + ([Path(f"{st.out}-checkpoints")] if st.stage in ("align", "train") else [])
        for f in folders:  # the rule every writer follows (io.check_replace), with the recipe's wording
            check_replace(f, inputs, what="recipe stage output", flag="workdir")


def _adapter(r: Recipe) -> Path:
    """The adapter for the original model: recovered when the recipe prunes."""
    return r.workdir / ("recovered" if "prune" in r.stages else "adapter")


# each stage's library function, called with its settings record (the library modules load torch: imported when run)
def _prune(r: Recipe, st: Step, s: settings.PruneSettings) -> bool:

    prune(r.base, st.out, overwrite=True, **asdict(s))
    return True


def _align(r: Recipe, st: Step, cfg) -> bool:

    align(r.workdir / "pruned", st.out, cfg, **_resume_args(st))
    return True


def _train(r: Recipe, st: Step, cfg) -> bool:

    model = r.workdir / "aligned" if "align" in r.stages else r.workdir / "pruned" if "prune" in r.stages else r.base
    train(model, st.out, cfg, **_resume_args(st))
    return True


def _recover(r: Recipe, st: Step, s: settings.RecoverSettings) -> bool:

    recover(r.workdir / "adapter", r.base, st.out, overwrite=True, **asdict(s))
    return True


def _merge(r: Recipe, st: Step, s: settings.MergeSettings) -> bool:

    merge(r.base, _adapter(r), st.out, overwrite=True, **asdict(s))
    return True


RUNNERS = {"prune": _prune, "align": _align, "train": _train, "recover": _recover, "merge": _merge}


def _run_stage(r: Recipe, st: Step, typed: dict) -> None:
    run = RUNNERS.get(st.stage, _run_eval)
    if run(r, st, typed[st.stage]):  # eval returns False when loram.eval is not installed: nothing written
        _write_stage(st.out, st)


def _resume_args(st: Step) -> dict:
    """Resume from this stage's checkpoints when they come from the same config, else start clean."""

    ckpt = Path(f"{st.out}-checkpoints")
    same = stored_hash(ckpt) == st.hash and last_checkpoint(ckpt) is not None
    if not same and ckpt.exists():
        check_replace(ckpt, what="recipe checkpoint folder", flag="workdir")  # only a folder loram wrote
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    write_marker(ckpt, "run")
    _write_stage(ckpt, st)
    return {"resume": same, "overwrite": True}


def _run_eval(r: Recipe, st: Step, s: settings.EvalSettings) -> bool:
    """Evaluate with loram.eval when it is installed; otherwise say so and skip."""
    try:
        from .eval.runner import EvalRequest, evaluate
    except ImportError:
        print(f"[eval] skipped: loram.eval is not available in this install ({st.out} not written)")
        return False

    on = s.target or ("merged" if "merge" in r.stages else "adapter")
    req = EvalRequest(**s.request_fields(ppl=[(n, Path(f)) for n, f in (s.ppl or {}).items()],
                                         mc=[(n, Path(f)) for n, f in (s.mc or {}).items()]))
    targets = {"merged": (str(r.workdir / "merged"), None), "adapter": (r.base, str(_adapter(r))), "base": (r.base, None)}
    if on not in targets:
        raise LoramError(f"recipe eval.target {on!r} is unknown: use merged, adapter or base")
    model, adapter = targets[on]
    from .device import compute_dtype

    # streams when the model does not fit the budget; on the CPU, where `precision: auto` is fp32
    results = evaluate(model, adapter, req, dtype=compute_dtype(s.precision, "cpu", s.bf16), max_memory=s.max_memory)
    for x in results:
        print(f"[eval] {x.task} {x.metric} {x.value:.4f} (n={x.n})")
    with atomic_dir(st.out, overwrite=True, command="run") as tmp:
        write_json(Path(tmp) / "results.json", {"on": on, "results": [asdict(x) for x in results]})
    return True
