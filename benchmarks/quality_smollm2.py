"""Issue 5 (and 3) benchmark: does LoRAM pay off on a real model? SmolLM2-135M-Instruct, real data.

    OMP_NUM_THREADS=1 python benchmarks/quality_smollm2.py [--rows base,lora,stru,...] [--sweep 0.3,0.5,0.65,0.85]

Every row trains the same LoRA (r 8, alpha 16, q,k,v,o,gate,up,down; STEPS x 4 x 256 tokens, lr 1e-3
as the paper's OpenHermes runs, seed 0) on the same mixture, then evaluates on the ORIGINAL model
with the recovered adapter (LoRAM) and, for structured rows, also the pruned model with its own
adapter (served w/o recovery, the paper's Fig. 6 ablation):

    train mixture  instruct/math_data.json[:3000] + instruct/codegen-instruct.json[:4000] + gsm8k/train.jsonl[:3000]
                   (1/3 each; GSM8K rows become {"instruction": question, "output": answer})
    in-domain ppl  33 held-out rows of each of the three (response tokens only, as in training)
    OOD ppl        instruct/alpaca_en_demo.json[:100]
    accuracy       ARC-Easy, PIQA, OpenBookQA (mc/*.jsonl, first 60 rows each, 0-shot, acc_norm; recovered only)

    base      no fine-tuning                      lora      plain LoRA on the original (the baseline)
    rand      LoRAM-Rand  (random, 0.5, 4:28)     stru      LoRAM-Stru (Taylor, 0.5 on layers 4:28: 1.41x)
    aligned   LoRAM-Stru after ALIGN_STEPS of continual pre-training (wiki + C4) of the pruned model
    qloram    QLoRAM-Stru (stru's pruned model in NF4)
    stru_mlp  LoRAM-Stru pruning MLP channels only (0.62 on 4:28, attention kept: also 1.41x), chosen on
              benchmarks/quality_dev.py's dev split; aligned_mlp: the same after the alignment above
    aligned85 LoRAM-Stru at ratio 0.85 (2.03x) after the same alignment (the issue's ">= 2x with alignment")
    semi      LoRAM-Semi (SparseGPT 2:4)          unst      LoRAM-Unst (SparseGPT 50% unstructured)
    sweep     LoRAM-Stru at other ratios (ppl only), recovered vs served pruned (the paper's Fig. 7)

Each stage runs as its own `loram` process (clean peak RSS) and is skipped when its output exists in
--work, so an interrupted run resumes and `--assemble-only` rewrites the tables from what is there.
Writes benchmarks/results/quality_smollm2.{json,md} and quality_sweep.png. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
STEPS, ALIGN_STEPS, LAYERS = 40, 300, "4:28"
TRAIN = ["--steps", str(STEPS), "--micro-batch", "4", "--seq-len", "256", "--lr", "1e-3", "--seed", "0", "--logging-steps", "5"]
ALIGN_LR = "2e-5"
ALIGN = ["--steps", str(ALIGN_STEPS), "--seq-len", "128", "--micro-batch", "1", "--logging-steps", "20"]
# `train --anchor` on general instructions (issue 18, stop 17): Alpaca rows 728:999, which no OOD dev / test row and no
# --calibrate-general row reads; --anchor renders them as `loram train` renders rows
ANCHOR_ALPACA = f"{DATA}/instruct/alpaca_en_demo.json[728:]"


def _mlpallg_row(lr: str, sfx: str, anchor: bool | str, pruned: str = "stru_mlpallg", anchor_weight: str | None = None) -> tuple:
    """A row on the stru_mlpallg pruning (or ``pruned``, another global all-layer one), distill-aligned, trained through the original at ``lr`` (seed from the
    suffix _seed1 / _seed2), optionally anchored (True: on the C4 excerpt; "alpaca": on the general instructions
    ANCHOR_ALPACA). The original's top-k of the seed's rows is the cache of the
    offset_distilled_mlp_lr3e-3 row of that seed ({work} is filled in by train)."""
    how = {"stru_mlpallg": "", "stru_mlpallg_fisher_task": "Fisher scores on the training rows, "}[pruned]
    label = (f"LoRAM-Stru MLP-only all layers global allocation, {how}distill-aligned, trained through the original, "
             f"{'anchored, ' if anchor is True else 'anchored on general instructions, ' if anchor else ''}"
             f"{f'anchor weight {anchor_weight}, ' if anchor_weight else ''}LoRA lr {lr}"
             f"{', seed ' + sfx[-1] if sfx else ''}")
    extra = ["--original-offset", "--lr", lr, *(["--seed", sfx[-1]] if sfx else []),
             *(["--anchor", f"{DATA}/corpus/c4_demo.jsonl" if anchor is True else ANCHOR_ALPACA] if anchor else []),
             *(["--anchor-weight", anchor_weight] if anchor_weight else []),
             "--offset-cache", f"{{work}}/adapter_offset_distilled_mlp_lr3e-3{sfx}-checkpoints/teacher-topk"]
    return label, pruned, extra, True


ROWS = {  # name: (label, prune args or None, train extra, structured?)
    "base": ("base w/o FT", None, None, False),
    "lora": ("full LoRA", None, [], False),
    "rand": ("LoRAM-Rand", ["--method", "random", "--ratio", "0.5", "--layers", LAYERS], [], True),
    "stru": ("LoRAM-Stru", ["--method", "taylor", "--ratio", "0.5", "--layers", LAYERS], [], True),
    "aligned": ("LoRAM-Stru aligned", "stru", [], True),
    "qloram": ("QLoRAM-Stru", "stru", ["--quantize", "nf4"], True),
    "aligned85": ("LoRAM-Stru 0.85 aligned", "stru0.85", [], True),
    # chosen on the dev split (benchmarks/quality_dev.py): MLP channels only, attention kept, same 1.41x
    "stru_mlp": ("LoRAM-Stru MLP-only", ["--method", "taylor", "--ratio", "0.62", "--attn-ratio", "0", "--layers", LAYERS], [], True),
    "aligned_mlp": ("LoRAM-Stru MLP-only aligned", "stru_mlp", [], True),
    # chosen on the dev split after align --distill (issue 18): the same pruned models aligned to the original's
    # top-32 next-token distribution (300 steps, lr 1e-4, same corpus) instead of the LM loss
    "distilled_mlp": ("LoRAM-Stru MLP-only distill-aligned", "stru_mlp", [], True),
    "distilled85": ("LoRAM-Stru 0.85 distill-aligned", "stru0.85", [], True),
    # issue 18, chosen on the dev split: the same distill-aligned models, LoRA trained through the original (`train
    # --original-offset`, loram.offset; it trains on a seeded 160 of the mixture's rows, the Trainer samples another 160)
    "offset_distilled_mlp": ("LoRAM-Stru MLP-only distill-aligned, trained through the original", "stru_mlp", ["--original-offset"], True),
    "offset_distilled_mlp_lr2e-3": ("LoRAM-Stru MLP-only distill-aligned, trained through the original, LoRA lr 2e-3", "stru_mlp",
                                    ["--original-offset", "--lr", "2e-3"], True),
    "offset_distilled_mlp_lr3e-3": ("LoRAM-Stru MLP-only distill-aligned, trained through the original, LoRA lr 3e-3", "stru_mlp",
                                    ["--original-offset", "--lr", "3e-3"], True),
    "offset_distilled85_lr2e-3": ("LoRAM-Stru 0.85 distill-aligned, trained through the original, LoRA lr 2e-3", "stru0.85",
                                  ["--original-offset", "--lr", "2e-3"], True),
    # issue 18, chosen on the dev split: the same, plus `train --anchor` (KL to the adapter-off model on general
    # text, loram.anchor; the C4 excerpt the alignment reads, not the OOD set) at the larger lr it makes safe
    "offset_anchor_distilled_mlp_lr5e-3": ("LoRAM-Stru MLP-only distill-aligned, trained through the original, anchored, LoRA lr 5e-3",
                                           "stru_mlp", ["--original-offset", "--lr", "5e-3", "--anchor", f"{DATA}/corpus/c4_demo.jsonl"], True),
    # seed noise of the two rows above (issue 18): seed 1 draws other training rows, LoRA init and dropout
    "offset_distilled_mlp_lr3e-3_seed1": ("LoRAM-Stru MLP-only distill-aligned, trained through the original, LoRA lr 3e-3, seed 1",
                                          "stru_mlp", ["--original-offset", "--lr", "3e-3", "--seed", "1"], True),
    "offset_anchor_distilled_mlp_lr5e-3_seed1": ("LoRAM-Stru MLP-only distill-aligned, trained through the original, anchored, LoRA lr 5e-3, "
                                                 "seed 1", "stru_mlp", ["--original-offset", "--lr", "5e-3", "--anchor",
                                                                        f"{DATA}/corpus/c4_demo.jsonl", "--seed", "1"], True),
    "offset_distilled_mlp_lr3e-3_seed2": ("LoRAM-Stru MLP-only distill-aligned, trained through the original, LoRA lr 3e-3, seed 2",
                                          "stru_mlp", ["--original-offset", "--lr", "3e-3", "--seed", "2"], True),
    "offset_anchor_distilled_mlp_lr5e-3_seed2": ("LoRAM-Stru MLP-only distill-aligned, trained through the original, anchored, LoRA lr 5e-3, "
                                                 "seed 2", "stru_mlp", ["--original-offset", "--lr", "5e-3", "--anchor",
                                                                        f"{DATA}/corpus/c4_demo.jsonl", "--seed", "2"], True),
    # issue 18, stop 12, chosen on the dev split: `prune --allocate global` over all 30 layers (the MLP-only rows' channel
    # count, 22.9 k, ranked across layers 0:30), distill-aligned, trained through the original at lr 3e-3, three seeds;
    # and full LoRA at seeds 1, 2 (a seed-matched reference)
    "stru_mlpallg": ("LoRAM-Stru MLP-only, all layers, global allocation", ["--method", "taylor", "--ratio", "0.4965", "--attn-ratio", "0",
                                                                            "--layers", "0:30", "--allocate", "global"], [], True),
    **{f"offset_distilled_mlpallg_lr3e-3{sfx}": _mlpallg_row("3e-3", sfx, False) for sfx in ("", "_seed1", "_seed2")},
    # issue 18, stop 13, chosen on the dev split: the same with `train --anchor` at lr 5e-3 (without it, OOD was above
    # the base on 2 of 3 seeds)
    **{f"offset_anchor_distilled_mlpallg_lr5e-3{sfx}": _mlpallg_row("5e-3", sfx, True) for sfx in ("", "_seed1", "_seed2")},
    # issue 18, stop 14: those adapters recovered with --calibrate under --calibrate-general (chosen on the dev split)
    **{f"offset_distilled_mlpallg_lr3e-3{sfx}_calgen": (_mlpallg_row("3e-3", sfx, False)[0] + ", recovered with --calibrate "
                                                       "and --calibrate-general (general text kept at the base's)",
                                                       *_mlpallg_row("3e-3", sfx, False)[1:]) for sfx in ("", "_seed1", "_seed2")},
    **{f"offset_distilled_mlpallg_lr3e-3{sfx}_calgen128": (_mlpallg_row("3e-3", sfx, False)[0] + ", recovered with --calibrate "
                                                          "and --calibrate-general, 128 general rows",
                                                          *_mlpallg_row("3e-3", sfx, False)[1:]) for sfx in ("", "_seed1", "_seed2")},
    # issue 18, stop 15: the same pruning with its Taylor scores from 64 x 256 tokens of 162 training rows (`prune
    # --calib-data` reads training rows as `loram train` renders them; {work}: prepare_data's calib_task.jsonl). Dev
    # did not choose it (quality_dev.py mlpallg_task_*: 66 % at OOD +1.5 %), so no test row trains on it; the prune
    # is kept as the check that the training-rows path gives the dev split's plan and weights (it did, to the bit)
    "stru_mlpallg_task": ("LoRAM-Stru MLP-only, all layers, global allocation, Taylor scores on the training rows",
                          ["--method", "taylor", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30", "--allocate", "global",
                           "--calib-data", "{work}/data/calib_task.jsonl", "--calib-samples", "64", "--calib-seq-len", "256"], [], True),
    # issue 18, stop 16, chosen on the dev split (quality_dev.py mlpallg_fisher_task_8x128_*): the same channel count ranked by
    # `prune --method fisher` on 8 x 128 tokens of those 162 training rows, three seeds, recovered plainly and under the
    # stop-14 bound on general text. The prune and the alignment are the dev split's commands on the same inputs (the
    # same calibration sha256 and plan id), so the dev run's aligned model serves here when it is present
    "stru_mlpallg_fisher_task": ("LoRAM-Stru MLP-only, all layers, global allocation, Fisher scores on the training rows",
                                 ["--method", "fisher", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30", "--allocate", "global",
                                  "--calib-data", "{work}/data/calib_task.jsonl"], [], True),
    **{f"offset_distilled_mlpallg_fisher_task_lr3e-3{sfx}": _mlpallg_row("3e-3", sfx, False, "stru_mlpallg_fisher_task")
       for sfx in ("", "_seed1", "_seed2")},
    **{f"offset_distilled_mlpallg_fisher_task_lr3e-3{sfx}_calgen": (
        _mlpallg_row("3e-3", sfx, False, "stru_mlpallg_fisher_task")[0] + ", recovered with --calibrate and --calibrate-general "
        "(general text kept at the base's)", *_mlpallg_row("3e-3", sfx, False, "stru_mlpallg_fisher_task")[1:])
       for sfx in ("", "_seed1", "_seed2")},
    # stop 17, chosen on the dev split (quality_dev.py mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor*): the rows
    # above trained with `--anchor`, on the C4 excerpt or on general instructions (ANCHOR_ALPACA)
    **{f"offset_anchor{a}_distilled_mlpallg_fisher_task_lr3e-3{sfx}": _mlpallg_row("3e-3", sfx, a == "" or "alpaca",
                                                                                     "stru_mlpallg_fisher_task")
       for a in ("", "_alpaca") for sfx in ("", "_seed1", "_seed2")},
    # stop 17, after its test rows above (seeds 0 and 2 still over the base on OOD): twice the anchor's weight, chosen on
    # the dev split (quality_dev.py *_anchor_w2: 75.2 % at -0.35 % against weight 1's 75.7 % at -0.15 %)
    **{f"offset_anchor_w2_distilled_mlpallg_fisher_task_lr3e-3{sfx}": _mlpallg_row("3e-3", sfx, True, "stru_mlpallg_fisher_task", "2")
       for sfx in ("", "_seed1", "_seed2")},
    # stop 19, chosen on the dev split (quality_dev.py *_layeroffset_*): `train --original-offset --offset-at layers` (every decoder
    # layer corrected to the original's output on the original's input), NOT aligned, `--anchor` C4, on the fisher prunings at 2x
    # (1 of 3 KV groups and MLP channels over all layers; the dev prune's command on the same rows) and at 1.42x (MLP only)
    "stru_allg_fisher_task": ("LoRAM-Stru 2x, all layers, global allocation, Fisher scores on the training rows",
                              ["--method", "fisher", "--ratio", "0.7335", "--attn-ratio", "0.34", "--layers", "0:30", "--allocate", "global",
                               "--calib-data", "{work}/data/calib_task.jsonl"], [], True),
    **{f"layeroffset_anchor_{p}_fisher_task_lr{lr}{sfx}": (
        f"LoRAM-Stru {what}, Fisher scores on the training rows, not aligned, trained through the original after every layer "
        f"(--offset-at layers), anchored, LoRA lr {lr}{', seed ' + sfx[-1] if sfx else ''}", f"stru_{p}_fisher_task",
        ["--original-offset", "--offset-at", "layers", "--lr", lr, "--anchor", f"{DATA}/corpus/c4_demo.jsonl",
         *(["--seed", sfx[-1]] if sfx else [])], True)
       for p, what, lr in (("allg", "2x, all layers, global allocation", "1e-3"),
                           ("mlpallg", "MLP-only, all layers, global allocation", "2e-3"))
       for sfx in ("", "_seed1", "_seed2")},
    "lora_seed1": ("full LoRA, seed 1", None, ["--seed", "1"], False),
    "lora_seed2": ("full LoRA, seed 2", None, ["--seed", "2"], False),
    "semi": ("LoRAM-Semi (SparseGPT 2:4)", ["--method", "sparsegpt", "--sparsity", "2:4"], [], False),
    "unst": ("LoRAM-Unst (SparseGPT 50%)", ["--method", "sparsegpt", "--sparsity", "unstructured", "--ratio", "0.5"], [], False),
}
ORDER = ["base", "lora", "rand", "stru", "aligned", "qloram", "semi", "unst", "stru_mlp", "aligned_mlp", "distilled_mlp", "aligned85",
         "distilled85", "offset_distilled_mlp", "offset_distilled_mlp_lr2e-3",
         "offset_distilled_mlp_lr3e-3", "offset_distilled85_lr2e-3", "offset_anchor_distilled_mlp_lr5e-3",
         "offset_distilled_mlp_lr3e-3_seed1", "offset_anchor_distilled_mlp_lr5e-3_seed1", "offset_distilled_mlp_lr3e-3_seed2",
         "offset_anchor_distilled_mlp_lr5e-3_seed2", "lora_seed1", "lora_seed2", "offset_distilled_mlpallg_lr3e-3",
         "offset_distilled_mlpallg_lr3e-3_seed1", "offset_distilled_mlpallg_lr3e-3_seed2", "offset_anchor_distilled_mlpallg_lr5e-3",
         "offset_anchor_distilled_mlpallg_lr5e-3_seed1", "offset_anchor_distilled_mlpallg_lr5e-3_seed2",
         "offset_distilled_mlpallg_lr3e-3_calgen", "offset_distilled_mlpallg_lr3e-3_seed1_calgen",
         "offset_distilled_mlpallg_lr3e-3_seed2_calgen", "offset_distilled_mlpallg_lr3e-3_calgen128",
         "offset_distilled_mlpallg_lr3e-3_seed1_calgen128", "offset_distilled_mlpallg_lr3e-3_seed2_calgen128",
         *(f"offset_distilled_mlpallg_fisher_task_lr3e-3{sfx}{c}" for c in ("", "_calgen") for sfx in ("", "_seed1", "_seed2")),
         *(f"offset_anchor{w}_distilled_mlpallg_fisher_task_lr3e-3{sfx}" for w in ("", "_w2") for sfx in ("", "_seed1", "_seed2")),
         *(k for k in ROWS if k.startswith("layeroffset_"))]
# rows that recover another row's adapter with `loram recover` flags: row -> (the row whose adapter, flags); {calibrate},
# {general}: prepare_data's calibration rows (quality_dev.py's; disjoint from every training, dev and test row)
RECOVER = {f"offset_distilled_mlpallg_lr3e-3{sfx}_calgen": (f"offset_distilled_mlpallg_lr3e-3{sfx}",
                                                            ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-general", "{general}"])
           for sfx in ("", "_seed1", "_seed2")} | {
    f"offset_distilled_mlpallg_lr3e-3{sfx}_calgen128": (f"offset_distilled_mlpallg_lr3e-3{sfx}",
                                                       ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-general",
                                                        "{general128}", "--calibrate-general-rows", "128"])
    for sfx in ("", "_seed1", "_seed2")} | {  # stop 14, after the dev variant *_calgen128: 128 general rows
    f"offset_distilled_mlpallg_fisher_task_lr3e-3{sfx}_calgen": (f"offset_distilled_mlpallg_fisher_task_lr3e-3{sfx}",
                                                                 ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-general",
                                                                  "{general}"])
    for sfx in ("", "_seed1", "_seed2")}
# the rows on the global all-layer prunings (ROWS order: the tables list them so)
# (the distill-aligned ones, named so: the layer-offset rows on the same pruning train on it as pruned)
GLOBAL = [k for k, v in ROWS.items() if v[1] in ("stru_mlpallg", "stru_mlpallg_fisher_task") and "_distilled_" in k]
ALIGNED = {"aligned": "stru", "aligned85": "stru0.85", "aligned_mlp": "stru_mlp",  # row: the pruned model it aligns
           "distilled_mlp": "stru_mlp", "distilled85": "stru0.85", "offset_distilled_mlp": "stru_mlp", "offset_distilled85_lr2e-3": "stru0.85",
           "offset_distilled_mlp_lr2e-3": "stru_mlp", "offset_distilled_mlp_lr3e-3": "stru_mlp",
           "offset_anchor_distilled_mlp_lr5e-3": "stru_mlp", "offset_distilled_mlp_lr3e-3_seed1": "stru_mlp",
           "offset_anchor_distilled_mlp_lr5e-3_seed1": "stru_mlp", "offset_distilled_mlp_lr3e-3_seed2": "stru_mlp",
           "offset_anchor_distilled_mlp_lr5e-3_seed2": "stru_mlp", **{k: ROWS[k][1] for k in GLOBAL}}
DISTILLED = {"distilled_mlp", "distilled85", "offset_distilled_mlp", "offset_distilled_mlp_lr2e-3", "offset_distilled_mlp_lr3e-3",
             "offset_distilled85_lr2e-3", "offset_anchor_distilled_mlp_lr5e-3", "offset_distilled_mlp_lr3e-3_seed1",
             "offset_anchor_distilled_mlp_lr5e-3_seed1", "offset_distilled_mlp_lr3e-3_seed2",
             "offset_anchor_distilled_mlp_lr5e-3_seed2", *GLOBAL}  # aligned with `align --distill`
DISTILL_LR = "1e-4"  # align --distill rows (chosen on the dev split, benchmarks/quality_dev.py)
MC = {"arc_easy": "mc/arc_easy.jsonl", "piqa": "mc/piqa.jsonl", "obqa": "mc/openbook_qa.jsonl"}
MC_ROWS = 60
ORIGINAL_PARAMS = 134_515_008  # SmolLM2-135M-Instruct (tied embeddings counted once)


class Missing(Exception):
    pass


ASSEMBLE_ONLY = False


def sh(cmd: list[str], log: Path) -> None:
    if ASSEMBLE_ONLY:
        raise Missing(" ".join(cmd[:3]))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}) after {time.time() - t0:.0f} s: {' '.join(cmd)} - see {log}")
    print(f"  {time.time() - t0:6.0f} s  {' '.join(cmd[:3])} -> {log.name}", flush=True)


def mixture_rows(out: Path, math: slice, code: slice, gsm: slice) -> None:
    """Write ``out`` (jsonl): those rows of the training mixture's three sources, as instruction/output rows."""
    rows = json.loads((DATA / "instruct/math_data.json").read_text())[math]
    rows += json.loads((DATA / "instruct/codegen-instruct.json").read_text())[code]
    rows += [{"instruction": r["question"], "output": r["answer"]} for r in
             map(json.loads, (DATA / "gsm8k/train.jsonl").read_text().splitlines()[gsm])]
    rows = [{k: v for k, v in r.items() if k in ("instruction", "input", "output", "response")} for r in rows]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def interleaved_rows(out: Path, n: int) -> None:
    """``out`` (jsonl): the first ``n`` training rows of each of the mixture's three sources, interleaved (one of each
    in turn), as quality_dev.py's subset variants train on them (its train_mix.jsonl)."""
    tmp = out.with_suffix(".sources.jsonl")
    mixture_rows(tmp, slice(0, n), slice(0, n), slice(0, n))
    rows = tmp.read_text().splitlines(keepends=True)
    out.write_text("".join(rows[i + n * s] for i in range(n) for s in range(3)))
    tmp.unlink()


def calibration_rows(d: Path) -> dict:
    """`loram recover --calibrate` / `--calibrate-general` rows (32 each), written once into ``d``: in-domain from
    the mixture's sources past its rows (math_data from 3212: row 3209 repeats a training row's instruction),
    general from Alpaca rows 600:632, or 600:728 (OOD test: :100, dev: 500:600)."""
    if not (d / "calibrate.jsonl").exists():
        mixture_rows(d / "calibrate.jsonl", slice(3212, 3223), slice(4200, 4211), slice(3100, 3110))
    for name, rows in (("general", slice(600, 632)), ("general128", slice(600, 728))):  # the second: --calibrate-general-rows 128
        if not (d / f"{name}.jsonl").exists():
            (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                     json.loads((DATA / "instruct/alpaca_en_demo.json").read_text())[rows]))
    return {"calibrate": str(d / "calibrate.jsonl"), "general": str(d / "general.jsonl"), "general128": str(d / "general128.jsonl")}


def prepare_data(work: Path) -> dict:
    """The mixture and the held-out files (GSM8K turned into instruction rows), written once."""
    d = work / "data"
    if not (d / "indomain.jsonl").exists():
        d.mkdir(parents=True, exist_ok=True)
        gsm = [json.loads(x) for x in (DATA / "gsm8k/train.jsonl").read_text().splitlines()[:3000]]
        (d / "gsm8k_train.jsonl").write_text("".join(json.dumps({"instruction": r["question"], "output": r["answer"]}) + "\n" for r in gsm))
        held = json.loads((DATA / "instruct/math_data.json").read_text())[3000:3033]
        held += [{k: r[k] for k in ("instruction", "input", "response")} for r in
                 json.loads((DATA / "instruct/codegen-instruct.json").read_text())[4000:4033]]
        held += [{"instruction": r["question"], "output": r["answer"]} for r in
                 map(json.loads, (DATA / "gsm8k/test.jsonl").read_text().splitlines()[:33])]
        held = [{k: v for k, v in r.items() if k in ("instruction", "input", "output", "response")} for r in held]
        (d / "indomain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    if not (d / "calib_task.jsonl").exists():  # stru_mlpallg_task's --calib-data: quality_dev.py's 162 training rows
        interleaved_rows(d / "calib_task.jsonl", 54)
    for k, f in MC.items():
        if not (d / f"{k}_{MC_ROWS}.jsonl").exists():  # the first MC_ROWS rows of each (a CPU budget: ~1 min per task per model)
            (d / f"{k}_{MC_ROWS}.jsonl").write_text("".join((DATA / f).read_text().splitlines(keepends=True)[:MC_ROWS]))
    return {"train": [f"{DATA}/instruct/math_data.json[:3000]", f"{DATA}/instruct/codegen-instruct.json[:4000]",
                      f"{d}/gsm8k_train.jsonl"],
            "ppl": {"in_domain": f"{d}/indomain.jsonl", "alpaca_ood": f"{DATA}/instruct/alpaca_en_demo.json"},
            "mc": {k: f"{d}/{k}_{MC_ROWS}.jsonl" for k in MC}, **calibration_rows(d)}


def evaluate(work: Path, name: str, model: str, adapter: str | None, data: dict, mc: bool = True) -> dict:
    out = work / f"eval_{name}.json"
    if not out.exists():
        cmd = ["loram", "eval", model, "--seq-len", "256", "--limit", "100", "--json"]
        cmd += ["--adapter", adapter] if adapter else []
        for k, f in data["ppl"].items():
            cmd += ["--ppl", f"{k}={f}"]
        for k, f in (data["mc"].items() if mc else ()):
            cmd += ["--mc", f"{k}={f}"]
        log = work / f"eval_{name}.log"
        sh(cmd, log)
        text = log.read_text()
        out.write_text(text[text.index("{"):text.rindex("}") + 1])
    return json.loads(out.read_text())


def train(work: Path, name: str, model: str, extra: list[str], data: dict) -> dict:
    out = work / name
    if not (out / "train_report.json").exists():
        # {work}: rows that reuse another row's cache of the original's top-k (the same seed draws the same rows)
        cmd = ["loram", "train", model, "-o", str(out), "--overwrite", *TRAIN, *(x.format(work=work) for x in extra)]
        for f in data["train"]:
            cmd += ["--data", f"{f}=0.3333"]
        sh(cmd, work / f"{name}.log")
    rep = json.loads((out / "train_report.json").read_text())
    return {k: rep.get(k) for k in ("wall_s", "tokens", "tokens_per_s", "peak_rss_gb", "trainable_params", "frozen_params")}


def prune(work: Path, name: str, args: list[str]) -> Path:
    out = work / f"pruned_{name}"
    if not (out / "loram_plan.json").exists():
        sh(["loram", "prune", "smollm2", "-o", str(out), "--overwrite", *(a.format(work=work) for a in args)], work / f"prune_{name}.log")
    return out


def recover(work: Path, adapter: Path, out: Path | None = None, extra: tuple = ()) -> Path:
    out = out or work / f"{adapter.name}_recovered"
    if not (out / "adapter_config.json").exists():
        sh(["loram", "recover", str(adapter), "--base", "smollm2", "-o", str(out), "--overwrite", *extra], work / f"recover_{out.name}.log")
    return out


def align(work: Path, pruned: Path, lr: str = ALIGN_LR, out: Path | None = None, extra: tuple = ()) -> tuple[Path, dict]:
    out = out or work / f"aligned_{pruned.name.removeprefix('pruned_')}"
    if not (out / "align_report.json").exists():
        sh(["loram", "align", str(pruned), "-o", str(out), "--overwrite", *ALIGN, *extra, "--lr", lr, "--data", f"{DATA}/corpus/wiki_demo.txt=0.5",
            "--data", f"{DATA}/corpus/c4_demo.jsonl=0.5", "--eval", f"wikitext2={DATA}/wikitext2/valid.txt[:300]"],
           work / ("align.log" if out.name == "aligned_stru" else f"align_{out.name}.log"))
    rep = json.loads((out / "align_report.json").read_text())
    keep = {k: rep.get(k) for k in ("steps", "wall_s", "tokens", "tokens_per_s", "peak_rss_gb", "trainable_params", "eval_ppl")}
    keep["loss_first_last"] = [rep["losses"][0]["loss"], rep["losses"][-1]["loss"]] if rep.get("losses") else None
    return out, keep


def reduction(train_report: dict, structured: bool) -> float:
    """Parameter-reduction ratio: the original's parameters over the frozen base LoRA trained on
    (sparse models keep their shapes and store their zeros: 1.0)."""
    return ORIGINAL_PARAMS / train_report["frozen_params"] if structured else 1.0


def wikitext_ppl(work: Path, name: str, model: Path) -> float | None:
    """Raw-text perplexity of a (pruned) model on wikitext-2 valid, 128-token windows."""
    ev = evaluate_text(work, name, model)
    return metric(ev, "ppl", "wikitext2", "ppl")


def evaluate_text(work: Path, name: str, model: Path) -> dict:
    out = work / f"eval_{name}.json"
    if not out.exists():
        log = work / f"eval_{name}.log"
        lines = [x for x in (DATA / "wikitext2/valid.txt").read_text().splitlines() if x.strip()][:300]
        text = work / "data" / "wikitext2_valid300.txt"
        text.write_text("\n".join(lines) + "\n")
        sh(["loram", "eval", str(model), "--seq-len", "128", "--json", "--ppl", f"wikitext2={text}"], log)
        text = log.read_text()
        out.write_text(text[text.index("{"):text.rindex("}") + 1])
    return json.loads(out.read_text())


def run_row(work: Path, name: str, data: dict, res: dict) -> None:
    label, pr, extra, structured = ROWS[name]
    row = res["rows"].setdefault(name, {"label": label})
    if name == "base":
        row["recovered"] = evaluate(work, "base", "smollm2", None, data)
        row["reduction"] = 1.0
        return
    if pr is None:
        row["train"] = train(work, f"adapter_{name}", "smollm2", extra, data)
        row["recovered"] = evaluate(work, name, "smollm2", str(work / f"adapter_{name}"), data)
        row["reduction"] = 1.0
        return
    pruned = prune(work, pr if isinstance(pr, str) else name, prune_args(pr) if isinstance(pr, str) else pr)
    if name in ALIGNED:
        key = ALIGNED[name]
        before = wikitext_ppl(work, f"wikitext_pruned_{key}", pruned)
        if name in DISTILLED:
            pruned, row["align"] = align(work, pruned, DISTILL_LR, work / f"distilled_{key}", ("--distill",))
        else:
            pruned, row["align"] = align(work, pruned)
        row["align"]["wikitext2_before_after"] = [before, wikitext_ppl(work, f"wikitext_{pruned.name}", pruned)]
    src, flags = RECOVER.get(name, (name, []))  # a RECOVER row trains nothing: it recovers src's adapter its own way
    row["train"] = train(work, f"adapter_{src}", str(pruned), extra, data)
    # NF4 packs two weights per stored element, so QLoRAM's frozen count is not a parameter count
    row["reduction"] = res["rows"]["stru"]["reduction"] if name == "qloram" and "stru" in res["rows"] else reduction(row["train"], structured)
    rec = recover(work, work / f"adapter_{src}", work / f"adapter_{name}_recovered", tuple(x.format(**data) for x in flags))
    row["recovered"] = evaluate(work, name, "smollm2", str(rec), data)
    cal = json.loads((rec / "loram_adapter.json").read_text()).get("calibration")
    if cal:  # what --calibrate chose and what it cost
        row["calibration"] = {k: cal.get(k) for k in ("scale", "loss_at_1", "loss", "loss_at_0", "passes", "seconds")}
        row["calibration"]["general"] = {k: cal["general"][k] for k in ("loss_at_0", "bound", "loss", "binding")} if cal.get("general") else None
    if structured and name not in RECOVER:  # perplexity only (the Fig. 6 ablation; MC on every served model would double the CPU time)
        row["served_pruned"] = evaluate(work, f"{name}_served", str(pruned), str(work / f"adapter_{name}"), data, mc=False)


def prune_args(key: str) -> list[str]:
    """`loram prune` arguments of a row ("stru") or a sweep point ("stru0.85")."""
    if key in ROWS:
        return ROWS[key][1]
    return ["--method", "taylor", "--ratio", key.removeprefix("stru"), "--layers", LAYERS]


def run_sweep(work: Path, ratio: float, data: dict, res: dict) -> None:
    key = f"{ratio:g}"
    row = res["sweep"].setdefault(key, {"ratio": ratio})
    if ratio == 0.5 and "stru" in res["rows"] and "served_pruned" in res["rows"]["stru"]:
        s = res["rows"]["stru"]
        row.update(reduction=s["reduction"], recovered=s["recovered"], served_pruned=s["served_pruned"])
        return
    name = f"stru{key}"
    pruned = prune(work, name, prune_args(name))
    row["reduction"] = reduction(train(work, f"adapter_{name}", str(pruned), [], data), True)
    rec = recover(work, work / f"adapter_{name}")
    row["recovered"] = evaluate(work, name, "smollm2", str(rec), data, mc=False)
    row["served_pruned"] = evaluate(work, f"{name}_served", str(pruned), str(work / f"adapter_{name}"), data, mc=False)


# ---- reporting ----------------------------------------------------------------------------------
def metric(ev: dict | None, kind: str, name: str, key: str) -> float | None:
    """``key`` ("ppl", "acc_norm") of task ``name`` in a `loram eval --json` result (kind: for the reader)."""
    for r in (ev or {}).get("results", []):
        if r["task"] == name and r["metric"] == key:
            return r["value"]
    return None


def fmt(x, f=".2f") -> str:
    return "-" if x is None else format(x, f)


def tables(res: dict) -> str:
    rows, base = res["rows"], res["rows"].get("base", {}).get("recovered")
    lines = [f"# LoRAM quality on SmolLM2-135M-Instruct ({STEPS} LoRA steps x 4 x 256 tokens, lr 1e-3, seed 0; same for every row)", "",
             f"Hardware: {res['hardware']}. Versions: {res['versions']}.", f"Commands: {res['command']}", "",
             "Perplexity on response tokens (in-domain: 99 held-out math / code / GSM8K rows; OOD: 100 Alpaca rows); accuracy "
             "`acc_norm` on the first 60 rows of ARC-Easy, PIQA, OpenBookQA (0-shot; a CPU budget, so +-6 points of noise), not "
             "measured on the served-pruned rows. *recovered* = the adapter recovered "
             "into the original model; *served pruned* = the pruned model with its own adapter (no recovery).", "",
             "| row | served as | param. reduction | in-domain ppl | OOD ppl (Alpaca) | ARC-E | PIQA | OBQA | train tok/s | train peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        r = rows.get(name)
        if not r:
            lines.append(f"| {ROWS[name][0]} | not run | | | | | | | | |")
            continue
        for how in ("recovered", "served_pruned"):
            ev = r.get(how)
            if how == "served_pruned" and (not ROWS[name][3] or name in RECOVER):  # a RECOVER row serves src's adapter: src's row
                continue
            t = r.get("train", {})
            red = r.get("reduction")
            red_s = fmt(red, ".2f") + "x" if red else "-"
            if name in ("semi", "unst"):
                red_s = f"1.00x stored ({fmt(1 / (1 - 0.5), '.1f')}x fewer non-zeros)"
            served = {"recovered": "original" if name in ("base", "lora") or name.startswith("lora_seed") else "recovered (LoRAM)", "served_pruned": "pruned, w/o recovery"}[how]
            lines.append(f"| {r['label']} | {served if ev else served + ': not run'} | {red_s} | "
                         f"{fmt(metric(ev, 'ppl', 'in_domain', 'ppl'), '.3f')} | {fmt(metric(ev, 'ppl', 'alpaca_ood', 'ppl'), '.3f')} | "
                         + " | ".join(fmt(metric(ev, "mc", k, "acc_norm"), ".2f") for k in ("arc_easy", "piqa", "obqa"))
                         + f" | {fmt(t.get('tokens_per_s'), '.0f') if how == 'recovered' else ''} | "
                         f"{fmt(t.get('peak_rss_gb'), '.2f') if how == 'recovered' else ''} |")
    lines += goals(res)
    for name, key in ALIGNED.items():
        al = rows.get(name, {}).get("align")
        if not al or name in RECOVER:  # a RECOVER row's alignment is its src row's
            continue
        lines += ["", f"Alignment for *{ROWS[name][0]}* ({' '.join(prune_args(key))}): {al['steps']} steps x {al['tokens'] // max(1, al['steps'])} tokens "
                  f"(wiki + C4, {'`--distill`, KL to the original top-32, lr ' + DISTILL_LR if name in DISTILLED else 'LM loss, lr ' + ALIGN_LR}, "
                  f"full-parameter, embeddings/lm_head frozen): {al['tokens_per_s']:.0f} tok/s, peak RSS "
                  f"{al['peak_rss_gb']:.2f} GB, loss {al['loss_first_last'][0]:.2f} -> {al['loss_first_last'][1]:.2f}, "
                  f"wikitext-2 valid ppl of the pruned model (first 300 lines, 128-token windows, `loram eval`) "
                  f"{fmt((al.get('wikitext2_before_after') or [None])[0])} -> {fmt((al.get('wikitext2_before_after') or [None, None])[1])}."]
    if res.get("sweep"):
        lines += ["", "## Pruning-ratio sweep (LoRAM-Stru, Taylor, layers 4:28; the paper's Fig. 7)", "",
                  "| ratio | param. reduction | in-domain ppl recovered | in-domain ppl served pruned | OOD ppl recovered | OOD ppl served pruned |",
                  "|---|---|---|---|---|---|"]
        for k in sorted(res["sweep"], key=float):
            s = res["sweep"][k]
            lines.append(f"| {k} | {fmt(s.get('reduction'))}x | " + " | ".join(
                fmt(metric(s.get(h), "ppl", m, "ppl"), ".3f") for m in ("in_domain", "alpaca_ood") for h in ("recovered", "served_pruned")) + " |")
        lines += ["", f"Base (no fine-tuning): in-domain {fmt(metric(base, 'ppl', 'in_domain', 'ppl'), '.3f')}, "
                  f"OOD {fmt(metric(base, 'ppl', 'alpaca_ood', 'ppl'), '.3f')}. ![sweep](quality_sweep.png)"]
    return "\n".join(lines) + "\n"


def goals(res: dict) -> list[str]:
    """The issue's goals for every structured row: share of full LoRA's in-domain gain (>= 50 %), OOD no
    worse than the base, and recovered better than served pruned."""
    rows = res["rows"]
    g = lambda n, h, m: metric(rows.get(n, {}).get(h), "ppl", m, "ppl")  # noqa: E731
    b_in, l_in, b_ood = g("base", "recovered", "in_domain"), g("lora", "recovered", "in_domain"), g("base", "recovered", "alpaca_ood")
    out = ["", "Goals (issue 5): in-domain gain >= 50 % of full LoRA's, OOD no worse than the base (at 1.41x, and at >= 2x aligned):", ""]
    if None in (b_in, l_in, b_ood):
        return out + ["- base and full LoRA have not both run"]
    out += ["| row | param. reduction | share of full LoRA's in-domain gain | OOD vs base | recovered vs served pruned (in-domain, OOD) "
            "| share of the same seed's full LoRA gain |", "|---|---|---|---|---|---|"]
    for name in ORDER:
        s_in, s_ood = g(name, "recovered", "in_domain"), g(name, "recovered", "alpaca_ood")
        if name in ("base", "lora") or name.startswith("lora_seed") or None in (s_in, s_ood):
            continue
        sv = (g(name, "served_pruned", "in_domain"), g(name, "served_pruned", "alpaca_ood"))
        served = f"{s_in:.2f} vs {sv[0]:.2f}, {s_ood:.2f} vs {sv[1]:.2f}" if None not in sv else "-"
        # seed-matched reference (lora_seed1/2 for the *_seed1/2 rows, lora for seed 0), where that full LoRA has run
        ref = g(seed_reference(name), "recovered", "in_domain")
        same = f"{(b_in - s_in) / (b_in - ref):.0%}" if ref is not None else "-"
        out.append(f"| {ROWS[name][0]} | {fmt(rows[name].get('reduction'))}x | {(b_in - s_in) / (b_in - l_in):.0%} | "
                   f"{s_ood / b_ood - 1:+.1%} | {served} | {same} |")
    refs = [n for n in ("lora", "lora_seed1", "lora_seed2") if g(n, "recovered", "in_domain") is not None]
    if len(refs) > 1:
        out += ["", "Full LoRA by seed (in-domain ppl, OOD vs base): " + "; ".join(
            f"seed {n[-1] if n != 'lora' else 0}: {g(n, 'recovered', 'in_domain'):.3f}, {g(n, 'recovered', 'alpaca_ood') / b_ood - 1:+.1%}"
            for n in refs)]
    return out


def seed_reference(name: str) -> str:
    """The full-LoRA row trained with the same --seed as ``name`` (the rows' seed: _seed1 / _seed2 in the name)."""
    m = re.search(r"_seed(\d)", name)
    return f"lora_seed{m.group(1)}" if m else "lora"


def sweep_png(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(res["sweep"], key=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, m, title in zip(axes, ("in_domain", "alpaca_ood"), ("in-domain ppl", "out-of-domain ppl (Alpaca)")):
        for h, style in (("recovered", "o-"), ("served_pruned", "s--")):
            xs = [float(k) for k in ks if metric(res["sweep"][k].get(h), "ppl", m, "ppl") is not None]
            ys = [metric(res["sweep"][f"{x:g}"].get(h), "ppl", m, "ppl") for x in xs]
            ax.plot(xs, ys, style, label="LoRAM (recovered)" if h == "recovered" else "pruned + LoRA, served pruned")
        b = metric(res["rows"].get("base", {}).get("recovered"), "ppl", m, "ppl")
        if b:
            ax.axhline(b, color="grey", lw=0.8, label="base, no fine-tuning")
        ax.set(xlabel="pruning ratio (layers 4:28)", title=title, yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default=",".join(ORDER))
    ap.add_argument("--sweep", default="0.3,0.5,0.65,0.85")
    ap.add_argument("--work", default="runs/bench-quality")
    ap.add_argument("--assemble-only", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="do not start from the rows of the existing results JSON")
    a = ap.parse_args()
    global ASSEMBLE_ONLY
    ASSEMBLE_ONLY = a.assemble_only
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs the shared data (../shared/data)")
    work = ROOT / a.work
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    res = {"rows": {}, "sweep": {}, "command": "python benchmarks/quality_smollm2.py " + " ".join(sys.argv[1:])}
    old = RESULTS / "quality_smollm2.json"
    if old.exists() and not a.fresh:  # rows measured by earlier invocations (their --work may be gone) stay in the tables
        prev = json.loads(old.read_text())
        res.update(rows=prev.get("rows", {}), sweep=prev.get("sweep", {}),
                   command=f"{prev.get('command', '')}; on {time.strftime('%Y-%m-%d')}: `{res['command']}`")
        if prev.get("hardware"):
            res["hardware"] = prev["hardware"]
    t0 = time.time()
    jobs = [(f"row {n}", run_row, n) for n in a.rows.split(",") if n]
    jobs += [(f"sweep {r}", run_sweep, float(r)) for r in a.sweep.split(",") if r]
    for title, fn, arg in jobs:  # each job saves its stages in --work; a table is written after each
        print(title, flush=True)
        try:
            fn(work, arg, data, res)
        except Missing as m:
            print(f"  not run: {m}")
        report(res, t0)
    return 0


def report(res: dict, t0: float) -> None:
    import torch
    import transformers

    # rows of earlier invocations keep their (hand-completed) hardware line; a fresh results file gets this machine
    res.setdefault("hardware", f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    res["wall_s_this_invocation"] = round(time.time() - t0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality_smollm2.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "quality_smollm2.md").write_text(tables(res))
    if any(s.get("recovered") for s in res["sweep"].values()):
        sweep_png(res, RESULTS / "quality_sweep.png")


if __name__ == "__main__":
    sys.exit(main())
