"""Issue 18, the demo goal: tries on the demo's DEV split, each recorded (including the ones that did not help).

    python benchmarks/demo_dev.py --demo runs/demo NAME [key=value ...]

--demo is a finished `loram demo` folder (its base/, pruned/, adapter-pruned/ and data/). A try changes one
thing and scores, on the dev split, the pruned model served with its adapter and the original with the
recovered adapter (exact match, 100 rows; general-text perplexity, the demo's shipped text):

    scale=S                the demo's recovered adapter with its update scaled by S (no training)
    calibrate=global|layer the demo's adapter recovered again with `loram recover --calibrate` on 32 training rows
                           the demo never trained on (train.jsonl[1900:1932]; 60 steps x 8 rows read at most 480)
    ratio=R attn_ratio=A compensate=True
                           prune the base again (taylor) with these, train as the demo trains, recover
    steps=N lr=X rank=K targets=q,k,v,o original_offset=True
                           the demo's training with these changed (original_offset: `loram train --original-offset`)
    anchor=True anchor_weight=W
                           `loram train --anchor` on the shipped anchor text (demo_general.ANCHOR_TEXT: another Austen
                           novel than the general text the rows score), weight W
    kl_steps=N kl_lr=X     before training LoRA, `loram align --distill` the pruned model to the original on the
                           task's training rows (rendered with the chat template as text; N steps of 8 x 128
                           tokens, lr X, top-32): in-domain distillation
                           (the row "kl20" was measured by an earlier prototype loop: full-vocabulary KL on
                           unpacked rows; "kl20_align" is this command)

Appends each try (with its wall seconds) to benchmarks/results/demo_dev.jsonl and rewrites demo_dev.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results"


from loram.demo import DemoConfig, train_adapter  # noqa: E402
from loram.demo_general import general_text  # noqa: E402
from loram.eval import exact_match, load_for_eval, perplexity_text  # noqa: E402
from loram.prune import prune  # noqa: E402
from loram.recover import recover  # noqa: E402

PRUNE = {"ratio": float, "attn_ratio": float, "compensate": lambda v: v == "True"}
TRAIN = {"steps": int, "lr": float, "rank": int, "alpha": int, "targets": str, "original_offset": lambda v: v == "True",
         "anchor": lambda v: v == "True", "anchor_weight": float}


def kl_align(demo: Path, pruned: Path, out: Path, steps: int, lr: float) -> None:
    """`loram align --distill` of ``pruned`` on the task's training rows as text (see the module doc) into ``out``."""
    import subprocess

    from loram.data.rows import to_messages
    from loram.io import load_tokenizer

    tok = load_tokenizer(demo / "base")
    rows = [json.loads(line) for line in open(demo / "data" / "train.jsonl")]
    text = out.parent / "align_rows.jsonl"
    text.write_text("".join(json.dumps({"text": tok.apply_chat_template(to_messages(r), tokenize=False)}) + "\n" for r in rows))
    subprocess.run([sys.executable, "-m", "loram", "align", str(pruned), "-o", str(out), "--overwrite", "--data", str(text),
                    "--distill", "--teacher", str(demo / "base"), "--steps", str(steps), "--lr", str(lr), "--seq-len", "128", "--micro-batch", "8",
                    "--logging-steps", "5"], check=True)


def score(model: Path, adapter: Path, dev: list[dict], text: str, scale: float = 1.0) -> dict:
    m, tok = load_for_eval(str(model), str(adapter), merge=scale == 1.0)
    if scale != 1.0:  # PEFT attached: the update is (alpha / r) * B A * scale
        from peft.tuners.lora import LoraLayer

        for mod in m.modules():
            if isinstance(mod, LoraLayer):
                for k in mod.scaling:
                    mod.scaling[k] *= scale
    em = exact_match(m, tok, [r["instruction"] for r in dev], [r["output"] for r in dev], max_new_tokens=16, batch_size=25)
    return {"exact_match": em.accuracy, "general_ppl": round(perplexity_text(m, tok, text, seq_len=512, batch_size=4).ppl, 2)}


def run(demo: Path, name: str, knobs: dict[str, str], work: Path) -> dict:
    t0 = time.time()
    dev = [json.loads(line) for line in open(demo / "data" / "dev.jsonl")]
    text = general_text(None)
    row = {"name": name, "knobs": knobs}
    if set(knobs) == {"scale"}:
        row["recovered"] = score(demo / "base", demo / "adapter-recovered", dev, text, float(knobs["scale"]))
    elif set(knobs) == {"calibrate"}:
        out = work / name
        recover(demo / "adapter-pruned", demo / "base", out, overwrite=True, calibrate=f"{demo / 'data' / 'train.jsonl'}[1900:1932]",
                calibrate_scope=knobs["calibrate"], seq_len=128)
        cal = json.loads((out / "loram_adapter.json").read_text())["calibration"]
        ls = cal.get("layer_scales") or []
        chosen = cal.get("scale") if knobs["calibrate"] == "global" else f"one per layer, {min(ls)}-{max(ls)}"
        row["note"] = f"(chosen scale: {chosen}; calibration {cal.get('seconds')} s)"
        row["recovered"] = score(demo / "base", out, dev, text)
    else:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        pkw = {k: PRUNE[k](v) for k, v in knobs.items() if k in PRUNE}
        pruned = demo / "pruned"
        if pkw:
            pruned = out / "pruned"
            row["param_reduction"] = round(prune(str(demo / "base"), pruned, method="taylor", **pkw).param_reduction, 3)
        if "kl_steps" in knobs:
            kl_align(demo, pruned, out / "aligned", int(knobs["kl_steps"]), float(knobs.get("kl_lr", 5e-5)))
            pruned = out / "aligned"
        cfg = DemoConfig(out=str(out), **{k: TRAIN[k](v) for k, v in knobs.items() if k in TRAIN})
        train_adapter(pruned, demo / "data" / "train.jsonl", out / "adapter-pruned", cfg)
        recover(out / "adapter-pruned", demo / "base", out / "adapter-recovered", overwrite=True)
        row["served_pruned"] = score(pruned, out / "adapter-pruned", dev, text)
        row["recovered"] = score(demo / "base", out / "adapter-recovered", dev, text)
    row["wall_s"] = round(time.time() - t0)
    return row


def write_md(rows: list[dict]) -> None:
    def f(r, k):
        if k not in r:
            return "—"
        g = r[k]["general_ppl"]
        return f"{r[k]['exact_match']:.0%} / " + ("—" if g is None else f"{g:.2f}")
    lines = ["# Demo, dev split: tries for issue 18's demo goal (recovered original vs pruned served with its adapter)", "",
             "`python benchmarks/demo_dev.py --demo DEMO_FOLDER NAME key=value ...` (see its doc); 2-core CPU shared with other "
             "jobs (wall times are rough). Dev split: 100 rows; exact match / general-text perplexity (base: 0 % / 37.90). "
             "DEMO_FOLDER for these rows: the full `loram demo` run of stop 6 (SmolLM2-135M-Instruct, taylor 0.3, 60 steps), "
             "whose base, pruned model, adapters and data every try starts from.", "",
             "| try | knobs | param. reduction | served pruned + adapter | recovered (LoRAM) | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items()) + (f" {r['note']}" if r.get("note") else "")
        lines.append(f"| {r['name']} | {knobs} | {r.get('param_reduction', '1.166')} | {f(r, 'served_pruned')} | {f(r, 'recovered')} | "
                     f"{r['wall_s']} |")
    (RESULTS / "demo_dev.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished `loram demo` folder")
    ap.add_argument("--work", type=Path, default=Path("runs/demo-dev"))
    ap.add_argument("name")
    ap.add_argument("knobs", nargs="*", help="key=value")
    a = ap.parse_args()
    row = run(a.demo, a.name, dict(k.split("=", 1) for k in a.knobs), a.work)
    print(json.dumps(row))
    log = RESULTS / "demo_dev.jsonl"
    with log.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    write_md([json.loads(line) for line in log.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
