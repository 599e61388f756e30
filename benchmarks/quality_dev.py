"""Issue 5 investigation: why does LoRAM-Stru reach only part of full LoRA's gain? Tried on a DEV split.

    OMP_NUM_THREADS=1 python benchmarks/quality_dev.py [--only stru,mlp_only,...]

quality_smollm2.py's test sets are never used to choose anything. This script scores knobs on a
separate dev split drawn from rows no test set and no training row uses:

    in-domain dev  math_data[3100:3133] + codegen-instruct[4100:4133] + gsm8k/train[3000:3033]
    OOD dev        alpaca_en_demo[500:600]           (the test set is alpaca_en_demo[:100])
    calibration    math_data[3212:3223] + codegen-instruct[4200:4211] + gsm8k/train[3100:3110]  (32 rows for
                   `loram recover --calibrate`: the training mixture's own sources, past its rows, and
                   disjoint from the dev rows above and quality_smollm2.py's test rows; math_data
                   starts at 3212 because row 3209 repeats a training row's instruction)
    general        alpaca_en_demo[600:632]         (32 rows for `--calibrate-general`: the kind of text OOD
                   measures, rows neither OOD set uses; 600:728 for the 128-row variant)
    anchor         alpaca_en_demo[728:999]         (`train --anchor` on general instructions, stop 17: rows no
                   OOD set and no --calibrate-general variant uses)

Every variant trains like quality_smollm2.py (same mixture, 40 steps x 4 x 256, seed 0) unless its
row says otherwise, then is served as the ORIGINAL model + recovered adapter. Adapters that
quality_smollm2.py already trained (base, lora, stru, aligned, semi, unst, sweep points) are reused
from its --work folder; only their dev evaluation is new. Perplexity only (no MC: CPU budget).
Writes benchmarks/results/quality_dev.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_smollm2 as q  # noqa: E402  (same stages, same caching)
import transfer_dev  # noqa: E402

# name: (what it tests, pruned-model key (prune_args) or None for the original, train extra, recover extra)
# MLP-only at 0.62: 0.62 x 2.65M MLP params ~ the 1.63M/layer that stru's 0.5 MLP + 1 of 3 KV groups removes -> 1.42x vs 1.41x
VARIANTS = {
    "base": ("no fine-tuning", None, None, []),
    "lora": ("full LoRA on the original", None, [], []),
    "stru": ("LoRAM-Stru as benchmarked (Taylor 0.5, MLP + 1/3 KV groups, lr 1e-3)", "stru", [], []),
    "stru_fill_normal": ("same adapter, recovered with --fill normal (paper's normA)", "stru", [], ["--fill", "normal"]),
    "aligned": ("stru after 300 alignment steps", "aligned", [], []),
    # {calibrate}: dev_data's calibration slice; the same --seq-len as the evaluation
    "stru_calibrated": ("stru's adapter recovered with --calibrate: one scale s chosen on 32 in-domain calibration rows", "stru", [],
                        ["--calibrate", "{calibrate}", "--seq-len", "256"]),
    "stru_calibrated_layer": ("same, one s per decoder layer (--calibrate-scope layer: 13 x 31 passes)", "stru", [],
                              ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-scope", "layer"]),
    "stru_scale0.7": ("stru's recovered adapter with its scaling x0.7 (a diagnostic: are the updates too large?)", "stru", [], ["scale", "0.7"]),
    "mlp_only": ("MLP channels only, ratio 0.62, attention kept (1.42x)", "mlp0.62", [], []),
    "mlp_aligned": ("mlp_only after the same 300 alignment steps (lr 2e-5)", "align:mlp0.62:2e-5", [], []),
    "mlp_distilled": ("mlp_only after 300 steps of `align --distill` (KL to the original's top-32, lr 1e-4; same corpus)",
                      "distill:mlp0.62:1e-4", [], []),
    "mlp_distilled_calibrated": ("mlp_distilled's adapter recovered with --calibrate (one scale, 32 calibration rows)",
                                 "distill:mlp0.62:1e-4", [], ["--calibrate", "{calibrate}", "--seq-len", "256"]),
    "mlp_distilled_calibrated_layer": ("same, one scale per decoder layer (--calibrate-scope layer)", "distill:mlp0.62:1e-4", [],
                                       ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-scope", "layer"]),
    # --calibrate chose s = 1.2, the top of its range, for mlp_distilled: is its update too small on the original?
    "mlp_distilled_lr2e-3": ("mlp_distilled's pruned model, LoRA at lr 2e-3 (full LoRA stays at 1e-3)", "distill:mlp0.62:1e-4",
                             ["--lr", "2e-3"], []),
    "mlp_distilled1200": ("mlp_only after 1200 steps of `align --distill` (4x the tokens; lr 1e-4; same corpus)",
                          "distill:mlp0.62:1e-4:1200", [], []),
    # 1200 steps transferred worse than 300 (drift from the original's weights): less drift
    "mlp_distilled100": ("mlp_only after 100 steps of `align --distill` (lr 1e-4)", "distill:mlp0.62:1e-4:100", [], []),
    "mlp_distilled_lr3e-5": ("mlp_only after 300 steps of `align --distill` at lr 3e-5", "distill:mlp0.62:3e-5", [], []),
    "distilled85": ("Taylor 0.85 (2.03x) after 300 steps of `align --distill` (lr 1e-4; same corpus)", "distill:stru0.85:1e-4", [], []),
    "distilled85_calibrated": ("distilled85's adapter recovered with --calibrate (one scale)", "distill:stru0.85:1e-4", [],
                               ["--calibrate", "{calibrate}", "--seq-len", "256"]),
    # `train --original-offset` (loram.offset): it trains on a seeded subset of the mixture, so these rows and their
    # reference full LoRA train on the same 162 rows (54 per source; the run draws 160): their share is of lora_rows162's gain
    "lora_rows162": ("full LoRA on the original, on the 162-row training subset (the reference of the *_rows162 / *_offset rows)",
                     None, [], []),
    "mlp_only_rows162": ("mlp_only on the 162-row subset", "mlp0.62", [], []),
    "mlp_only_offset": ("mlp_only on the 162-row subset, `train --original-offset` (top-32)", "mlp0.62", ["--original-offset"], []),
    "mlp_only_offset_lr2e-3": ("mlp_only_offset at LoRA lr 2e-3", "mlp0.62", ["--original-offset", "--lr", "2e-3"], []),
    "mlp_only_offset_calibrated": ("mlp_only_offset's adapter recovered with --calibrate (one scale, 32 calibration rows)", "mlp0.62",
                                   ["--original-offset"], ["--calibrate", "{calibrate}", "--seq-len", "256"]),
    "mlp_distilled_rows162": ("mlp_distilled on the 162-row subset", "distill:mlp0.62:1e-4", [], []),
    "mlp_distilled_offset": ("mlp_distilled on the 162-row subset, `train --original-offset` (top-32)", "distill:mlp0.62:1e-4",
                             ["--original-offset"], []),
    "mlp_distilled_offset_lr2e-3": ("mlp_distilled_offset at LoRA lr 2e-3", "distill:mlp0.62:1e-4", ["--original-offset", "--lr", "2e-3"],
                                    []),
    "mlp_distilled_offset_lr3e-3": ("mlp_distilled_offset at LoRA lr 3e-3", "distill:mlp0.62:1e-4",
                                    ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], []),
    "mlpg_distilled_offset_lr3e-3": ("mlp_distilled_offset_lr3e-3 with `prune --allocate global` (channels ranked across layers 4:28)",
                                     "distill:mlp0.62g:1e-4", ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], []),
    "mlpallg_distilled_offset_lr3e-3": ("same, the same channel count ranked across all 30 layers (--layers 0:30 --ratio 0.4965)",
                                        "distill:mlpall0.4965g:1e-4",
                                        ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], []),
    # stop 13: --anchor on the global all-layer pruning (its test OOD was above the base on 2 of 3 seeds)
    "mlpallg_distilled_offset_lr3e-3_anchor": ("mlpallg_distilled_offset_lr3e-3 with `--anchor` C4 (weight 1)", "distill:mlpall0.4965g:1e-4",
                                               ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}", "--anchor",
                                                "{anchor}"], []),
    "mlpallg_distilled_offset_lr5e-3_anchor": ("same at LoRA lr 5e-3 (the lr the anchor made safe on the 4:28 pruning)",
                                               "distill:mlpall0.4965g:1e-4",
                                               ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}", "--anchor",
                                                "{anchor}"], []),
    # stop 13: 2x with the global ranking over all layers: 1 of 3 KV groups per layer and 73 % of the MLP channels
    "allg_distilled_offset_lr2e-3": ("2x: all 30 layers, global MLP allocation (--ratio 0.7335) and 1 of 3 KV groups (--attn-ratio 0.34), "
                                     "distill-aligned, offset, lr 2e-3 (distilled85_offset_lr2e-3's training)", "distill:all0.7335g:1e-4",
                                     ["--original-offset", "--lr", "2e-3"], []),  # its own top-k cache: it ran beside the rows above
    "mlpall_distilled_offset_lr3e-3": ("the ablation of mlpallg: all 30 layers, uniform (--layers 0:30 --ratio 0.4965, no --allocate)",
                                       "distill:mlpall0.4965:1e-4", ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], []),
    "mlp_distilled_offset_lr5e-3": ("mlp_distilled_offset at LoRA lr 5e-3", "distill:mlp0.62:1e-4",
                                    ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}"], []),
    "mlp_distilled_offset_lr3e-3_calibrated": ("mlp_distilled_offset_lr3e-3's adapter recovered with --calibrate (one scale)",
                                               "distill:mlp0.62:1e-4", ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"],
                                               ["--calibrate", "{calibrate}", "--seq-len", "256"]),
    "mlp_distilled_offset_lr5e-3_calibrated": ("mlp_distilled_offset_lr5e-3's adapter recovered with --calibrate (one scale)",
                                               "distill:mlp0.62:1e-4", ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}"],
                                               ["--calibrate", "{calibrate}", "--seq-len", "256"]),
    # stop 14: --calibrate-general (the scale chosen on in-domain rows, keeping general text at the base's; grid to 2.0)
    **{f"{src}_calgen{sfx}": (f"{src}'s adapter recovered with --calibrate and --calibrate-general {what} (one scale, s in "
                              "0..2.0, general-text perplexity kept at the base's)", key,
                              extra, ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-general", gen])
       for src, key, extra in (("mlpallg_distilled_offset_lr3e-3", "distill:mlpall0.4965g:1e-4",
                                ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"]),
                               ("mlpallg_distilled_offset_lr5e-3_anchor", "distill:mlpall0.4965g:1e-4",
                                ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}", "--anchor", "{anchor}"]))
       for sfx, what, gen in (("", "Alpaca rows 600:632", "{general}"), ("_c4", "C4 rows 0:32", "{general_c4}"))},
    # a tighter bound: 128 general rows (--calibrate-general-rows; the in-domain rows stay 32)
    "mlpallg_distilled_offset_lr5e-3_anchor_calgen128": ("mlpallg_distilled_offset_lr5e-3_anchor_calgen with 128 general rows "
                                                         "(Alpaca 600:728, --calibrate-general-rows 128)", "distill:mlpall0.4965g:1e-4",
                                                         ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}",
                                                          "--anchor", "{anchor}"],
                                                         ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-general",
                                                          "{general128}", "--calibrate-general-rows", "128"]),
    # stop 15, training-side tries on mlpallg_distilled_offset_lr3e-3 (recovery cannot move the share/OOD line):
    # a more exact offset (the original's top-256 instead of top-32: less of the repair left to learn), a larger
    # LoRA dropout (an update robust to its input activations, which differ on the original), and a gentler
    # alignment (lr 3e-5: on the 4:28 pruning it kept OOD at the base's)
    "mlpallg_distilled_offset_lr3e-3_topk256": ("mlpallg_distilled_offset_lr3e-3 with --offset-top-k 256", "distill:mlpall0.4965g:1e-4",
                                                ["--original-offset", "--lr", "3e-3", "--offset-top-k", "256", "--offset-cache",
                                                 "{offset_cache}-k256"], []),
    "mlpallg_distilled_offset_lr3e-3_drop0.2": ("mlpallg_distilled_offset_lr3e-3 with LoRA --dropout 0.2 (default 0.05)",
                                                "distill:mlpall0.4965g:1e-4",
                                                ["--original-offset", "--lr", "3e-3", "--dropout", "0.2", "--offset-cache", "{offset_cache}"], []),
    "mlpallg_distilled3e-5_offset_lr3e-3": ("mlpallg_distilled_offset_lr3e-3 on the pruned model distill-aligned at lr 3e-5 (not 1e-4)",
                                            "distill:mlpall0.4965g:3e-5",
                                            ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], []),
    # stop 15: the Taylor scores from more text (default: 8 x 128 tokens of the built-in text): 64 x 256 tokens of the
    # training rows themselves (rendered as the training sees them), or of the C4 excerpt (the ablation: more tokens,
    # general text)
    **{f"mlpallg{c}_distilled_offset_lr3e-3": (f"mlpallg_distilled_offset_lr3e-3 pruned with Taylor scores on 64 x 256 tokens of {what}",
                                               f"distill:mlpall0.4965g{c}:1e-4",
                                               ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], [])
       for c, what in (("_task", "the training rows (train162, chat-rendered)"), ("_c4", "the C4 excerpt"))},
    # both were worse than the built-in 773 tokens: the same sources at the default 8 x 128 tokens (amount or source?)
    **{f"mlpallg{c}_8x128_distilled_offset_lr3e-3": (f"mlpallg_distilled_offset_lr3e-3 pruned with Taylor scores on 8 x 128 tokens of {what}",
                                                f"distill:mlpall0.4965g{c}_8x128:1e-4",
                                                ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], [])
       for c, what in (("_task", "the training rows"), ("_c4", "the C4 excerpt"))},
    # stop 16: `--method fisher` (per-sequence squared unit sums: they do not cancel across sequences as taylor's
    # summed gradient does) on the built-in text and on 8 x 128 tokens of the training rows, the two best of stop 15
    **{f"mlpallg_fisher{c}_distilled_offset_lr3e-3": (f"mlpallg_distilled_offset_lr3e-3 pruned with `--method fisher` on {what}",
                                                      f"distill:mlpall0.4965gF{c}:1e-4",
                                                      ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], [])
       for c, what in (("", "the built-in text (8 x 128 tokens)"), ("_task_8x128", "8 x 128 tokens of the training rows"))},
    # the same scores at 2x (allg_distilled_offset_lr2e-3's pruning and training, ranked by fisher on the training rows)
    "allg_fisher_task_8x128_distilled_offset_lr2e-3": ("allg_distilled_offset_lr2e-3 pruned with `--method fisher` on 8 x 128 tokens of "
                                                       "the training rows", "distill:all0.7335gF_task_8x128:1e-4",
                                                       ["--original-offset", "--lr", "2e-3", "--offset-cache", "{offset_cache}"], []),
    # its share left room for the stop-14 bound on general text (32 Alpaca rows), which trades share for OOD
    "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_calgen": ("mlpallg_fisher_task_8x128_distilled_offset_lr3e-3's adapter recovered "
                                                                 "with --calibrate and --calibrate-general Alpaca rows 600:632",
                                                                 "distill:mlpall0.4965gF_task_8x128:1e-4",
                                                                 ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"],
                                                                 ["--calibrate", "{calibrate}", "--seq-len", "256", "--calibrate-general",
                                                                  "{general}"]),
    # stop 17: the anchor (below) on stop 16's best setting, to move its OOD without the recovery-time bound: on the C4
    # excerpt as in stop 13, and on general instructions (Alpaca rows 728:999, rendered as `loram train` renders rows;
    # no dev / test / --calibrate-general row)
    **{f"mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor{sfx}": (f"mlpallg_fisher_task_8x128_distilled_offset_lr3e-3 with "
                                                                         f"`--anchor` {what} (weight 1)",
                                                                         "distill:mlpall0.4965gF_task_8x128:1e-4",
                                                                         ["--original-offset", "--lr", "3e-3", "--offset-cache",
                                                                          "{offset_cache}", "--anchor", src], [])
       for sfx, what, src in (("", "C4", "{anchor}"), ("_alpaca", "Alpaca rows 728:999", q.ANCHOR_ALPACA))},
    # after the C4 anchor's test run (seeds 0 and 2 still +0.12 / +0.48 % on OOD): twice its weight
    "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor_w2": ("mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor with "
                                                                    "--anchor-weight 2", "distill:mlpall0.4965gF_task_8x128:1e-4",
                                                                    ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}",
                                                                     "--anchor", "{anchor}", "--anchor-weight", "2"], []),
    # stop 18: the two OOD levers together (the anchor while training, the general-text bound at recovery): seed 2's test OOD
    # stayed above the base's with either alone
    "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor_calgen": ("mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor's "
                                                                        "adapter recovered with --calibrate and --calibrate-general "
                                                                        "Alpaca rows 600:632", "distill:mlpall0.4965gF_task_8x128:1e-4",
                                                                        ["--original-offset", "--lr", "3e-3", "--offset-cache",
                                                                         "{offset_cache}", "--anchor", "{anchor}"],
                                                                        ["--calibrate", "{calibrate}", "--seq-len", "256",
                                                                         "--calibrate-general", "{general}"]),
    # stop 18, 2x: the 1.41x setting's lr (3e-3) and the anchor on the fisher 2x pruning (allg_fisher_task_8x128_..._lr2e-3)
    "allg_fisher_task_8x128_distilled_offset_lr3e-3_anchor": ("allg_fisher_task_8x128_distilled_offset_lr2e-3 at LoRA lr 3e-3 with "
                                                              "`--anchor` C4 (weight 1)", "distill:all0.7335gF_task_8x128:1e-4",
                                                              ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}",
                                                               "--anchor", "{anchor}"], []),
    # stop 18, after the bound below (the 2x support holds 84 % of full LoRA's gain: the learning is what falls short): a
    # larger lr with the anchor, and the original's top-256 for the offset (at 2x the pruned model is far from the
    # original, so the part of the offset top-32 leaves out is larger than at 1.42x, where top-256 changed nothing)
    "allg_fisher_task_8x128_distilled_offset_lr5e-3_anchor": ("allg_fisher_task_8x128_distilled_offset_lr3e-3_anchor at LoRA lr 5e-3",
                                                              "distill:all0.7335gF_task_8x128:1e-4",
                                                              ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}",
                                                               "--anchor", "{anchor}"], []),
    "allg_fisher_task_8x128_distilled_offset_lr2e-3_topk256": ("allg_fisher_task_8x128_distilled_offset_lr2e-3 with --offset-top-k 256",
                                                               "distill:all0.7335gF_task_8x128:1e-4",
                                                               ["--original-offset", "--lr", "2e-3", "--offset-top-k", "256",
                                                                "--offset-cache", "{offset_cache}-k256"], []),
    # stop 19, 2x: the offset after every decoder layer (`--offset-at layers`, loram.layer_offset) on the fisher 2x pruning, NOT
    # aligned (with the corrections the pruned model computes the original's activations at step 0: nothing to align)
    **{f"allg_fisher_task_8x128_layeroffset_lr{lr}": (f"the 2x fisher plan, not aligned, `--original-offset --offset-at layers`, "
                                                      f"LoRA lr {lr}", "all0.7335gF_task_8x128",
                                                      ["--original-offset", "--offset-at", "layers", "--lr", lr], [])
       for lr in ("1e-3", "2e-3")},
    # ... and on the 1.42x fisher plan (mlpallg_fisher_task_8x128_*: stop 17's setting is distill-aligned + the logit offset)
    **{f"mlpallg_fisher_task_8x128_layeroffset_lr{lr}{a}": (f"the 1.42x fisher plan, not aligned, `--original-offset --offset-at "
                                                            f"layers`, LoRA lr {lr}{' with `--anchor` C4' if a else ''}",
                                                            "mlpall0.4965gF_task_8x128",
                                                            ["--original-offset", "--offset-at", "layers", "--lr", lr,
                                                             *(["--anchor", "{anchor}"] if a else [])], [])
       for lr in ("1e-3", "2e-3") for a in ("", "_anchor")},
    **{f"allg_fisher_task_8x128_layeroffset_lr{lr}_anchor": (f"allg_fisher_task_8x128_layeroffset_lr{lr} with `--anchor` C4 (weight 1)",
                                                             "all0.7335gF_task_8x128",
                                                             ["--original-offset", "--offset-at", "layers", "--lr", lr, "--anchor",
                                                              "{anchor}"], [])
       for lr in ("1e-3", "2e-3")},
    # stop 18, a bound on any LoRAM adapter: full LoRA's own update (lora_rows162) cut to what a plan keeps (its pruned rows /
    # columns zeroed, as recovery fills them): the share at 1.42x (the fisher plan above) and at 2x (its 2x plan)
    **{f"lora_rows162_restrict_{k}": (f"lora_rows162's adapter cut to the support of {what} (diagnostic: what an adapter "
                                      "that learned full LoRA's update exactly could carry over)", None, [], ["restrict", f"pruned_{k}"])
       for k, what in (("mlpall0.4965gF_task_8x128", "the 1.42x fisher plan"), ("all0.7335gF_task_8x128", "the 2x fisher plan"))},
    # --anchor (loram.anchor): KL to the adapter-off model on general text (C4 excerpt, the alignment corpus; OOD is Alpaca)
    "mlp_distilled_offset_lr5e-3_anchor": ("mlp_distilled_offset_lr5e-3 with `--anchor` C4 (weight 1, one 256-token block per micro-step)",
                                           "distill:mlp0.62:1e-4", ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}",
                                                                    "--anchor", "{anchor}"], []),
    "mlp_distilled_offset_lr5e-3_anchor10": ("same, --anchor-weight 10", "distill:mlp0.62:1e-4",
                                             ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}", "--anchor", "{anchor}",
                                              "--anchor-weight", "10"], []),
    "mlp_distilled_offset_lr8e-3_anchor": ("mlp_distilled_offset with `--anchor` C4 (weight 1) at LoRA lr 8e-3", "distill:mlp0.62:1e-4",
                                           ["--original-offset", "--lr", "8e-3", "--offset-cache", "{offset_cache}", "--anchor", "{anchor}"], []),
    "distilled85_offset_lr5e-3_anchor": ("distilled85_offset with `--anchor` C4 (weight 1) at LoRA lr 5e-3", "distill:stru0.85:1e-4",
                                         ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}", "--anchor", "{anchor}"], []),
    "mlp_distilled_offset_lr6e-3_anchor": ("mlp_distilled_offset with `--anchor` C4 (weight 1) at LoRA lr 6e-3", "distill:mlp0.62:1e-4",
                                           ["--original-offset", "--lr", "6e-3", "--offset-cache", "{offset_cache}", "--anchor", "{anchor}"], []),
    "distilled85_offset_lr2e-3_anchor": ("distilled85_offset_lr2e-3 with `--anchor` C4 (weight 1)", "distill:stru0.85:1e-4",
                                         ["--original-offset", "--lr", "2e-3", "--offset-cache", "{offset_cache}", "--anchor", "{anchor}"], []),
    # where the gain lives, and how each part transfers (benchmarks/transfer_dev.py keep): the other updates zeroed
    "lora_rows162_attn_updates": ("lora_rows162's adapter with only its q/k/v/o updates (diagnostic)", None, [], ["keep", "q,k,v,o"]),
    "lora_rows162_mlp_updates": ("lora_rows162's adapter with only its gate/up/down updates (diagnostic)", None, [], ["keep", "gate,up,down"]),
    "mlp_distilled_offset_lr3e-3_attn_updates": ("mlp_distilled_offset_lr3e-3's recovered adapter with only its q/k/v/o updates "
                                                 "(diagnostic; attention is not pruned here)", "distill:mlp0.62:1e-4",
                                                 ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], ["keep", "q,k,v,o"]),
    "mlp_distilled_offset_lr3e-3_mlp_updates": ("mlp_distilled_offset_lr3e-3's recovered adapter with only its gate/up/down updates "
                                                "(diagnostic)", "distill:mlp0.62:1e-4",
                                                ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"], ["keep", "gate,up,down"]),
    # input-matched transfer (benchmarks/transfer_dev.py transfer, a prototype): each lora_A re-fitted on the original's
    # inputs to give what it gave on the pruned model's, on 96 of the training rows (lam 0.01)
    "mlp_distilled_offset_lr3e-3_transfer": ("mlp_distilled_offset_lr3e-3's recovered adapter, lora_A re-fitted to the original's inputs",
                                             "distill:mlp0.62:1e-4", ["--original-offset", "--lr", "3e-3", "--offset-cache", "{offset_cache}"],
                                             ["transfer", "0.01"]),
    "mlp_distilled_offset_lr5e-3_transfer": ("mlp_distilled_offset_lr5e-3's recovered adapter, lora_A re-fitted to the original's inputs",
                                             "distill:mlp0.62:1e-4", ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}"],
                                             ["transfer", "0.01"]),
    "mlp_distilled_offset_lr5e-3_anchor_transfer": ("mlp_distilled_offset_lr5e-3_anchor's recovered adapter, lora_A re-fitted to the "
                                                    "original's inputs", "distill:mlp0.62:1e-4",
                                                    ["--original-offset", "--lr", "5e-3", "--offset-cache", "{offset_cache}", "--anchor",
                                                     "{anchor}"], ["transfer", "0.01"]),
    "lora_rows162_lr2e-3": ("lora_rows162 at lr 2e-3 (context: does full LoRA gain as much from the larger lr?)", None, ["--lr", "2e-3"], []),
    "distilled85_offset_lr2e-3": ("distilled85 on the 162-row subset, `train --original-offset`, LoRA lr 2e-3", "distill:stru0.85:1e-4",
                                  ["--original-offset", "--lr", "2e-3", "--offset-cache", "{offset_cache}"], []),
    "distilled85_rows162": ("distilled85 on the 162-row subset", "distill:stru0.85:1e-4", [], []),
    "distilled85_offset": ("distilled85 on the 162-row subset, `train --original-offset` (top-32)", "distill:stru0.85:1e-4",
                           ["--original-offset"], []),
    "stru_lr2e-3": ("stru, lr 2e-3", "stru", ["--lr", "2e-3"], []),
    "stru_lr5e-4": ("stru, lr 5e-4", "stru", ["--lr", "5e-4"], []),
    "aligned_lr1e-4": ("stru after 300 alignment steps at lr 1e-4 (5x the benchmark's 2e-5)", "align:stru:1e-4", [], []),
    "semi": ("LoRAM-Semi (2:4)", "semi", [], []),
    "unst": ("LoRAM-Unst (50%)", "unst", [], []),
    "stru0.85": ("Taylor 0.85 (2.03x), not aligned", "stru0.85", [], []),
    "aligned85": ("Taylor 0.85 (2.03x) after 300 alignment steps", "aligned85", [], []),
}
NORM_ADAPTERS = {"lora": "adapter_lora", "stru": "adapter_stru_recovered", "aligned": "adapter_aligned_recovered",
                 "stru_lr5e-4": "adapter_dev_stru_lr5e-4_recovered", "mlp_only": "adapter_dev_mlp_only_recovered",
                 "mlp_aligned": "adapter_dev_mlp_aligned_recovered",
                 "unst": "adapter_unst_recovered"}
# variants that only recover differently: they reuse this variant's trained adapter
SAME_ADAPTER = {"mlp_distilled_calibrated": "mlp_distilled", "mlp_distilled_calibrated_layer": "mlp_distilled",
                "distilled85_calibrated": "distilled85", "mlp_only_offset_calibrated": "mlp_only_offset",
                "mlp_distilled_offset_lr3e-3_calibrated": "mlp_distilled_offset_lr3e-3",
                "mlp_distilled_offset_lr5e-3_calibrated": "mlp_distilled_offset_lr5e-3",
                "lora_rows162_attn_updates": "lora_rows162", "lora_rows162_mlp_updates": "lora_rows162",
                "mlp_distilled_offset_lr3e-3_attn_updates": "mlp_distilled_offset_lr3e-3",
                "mlp_distilled_offset_lr3e-3_mlp_updates": "mlp_distilled_offset_lr3e-3",
                "mlp_distilled_offset_lr3e-3_transfer": "mlp_distilled_offset_lr3e-3",
                "mlp_distilled_offset_lr5e-3_transfer": "mlp_distilled_offset_lr5e-3",
                "mlp_distilled_offset_lr5e-3_anchor_transfer": "mlp_distilled_offset_lr5e-3_anchor",
                **{f"{src}_calgen{sfx}": src for src in ("mlpallg_distilled_offset_lr3e-3", "mlpallg_distilled_offset_lr5e-3_anchor")
                   for sfx in ("", "_c4")},
                "mlpallg_distilled_offset_lr5e-3_anchor_calgen128": "mlpallg_distilled_offset_lr5e-3_anchor",
                "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_calgen": "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3",
                "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor_calgen": "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor",
                **{f"lora_rows162_restrict_{k}": "lora_rows162" for k in ("mlpall0.4965gF_task_8x128", "all0.7335gF_task_8x128")}}
DERIVED = ("keep", "transfer", "scale", "restrict")  # recover extras that derive the served adapter from the plainly recovered one (derive)
SAME_ADAPTER_SUBSET = [k for k, v in SAME_ADAPTER.items() if v.startswith(("lora_rows162", "mlp_distilled_offset", "mlpallg_"))]
ANCHOR = f"{q.DATA}/corpus/c4_demo.jsonl"  # --anchor's general text
SUBSET_ROWS = 54  # per source, for the variants below (162 rows: the run's 40 x 4 = 160 draws nearly all of them)
SUBSET = {"lora_rows162", *(k for k in VARIANTS if "_layeroffset_" in k), "allg_fisher_task_8x128_distilled_offset_lr5e-3_anchor", "allg_fisher_task_8x128_distilled_offset_lr2e-3_topk256", "allg_fisher_task_8x128_distilled_offset_lr3e-3_anchor", "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor_w2", "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor", "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3_anchor_alpaca", "allg_fisher_task_8x128_distilled_offset_lr2e-3", "mlpallg_fisher_distilled_offset_lr3e-3", "mlpallg_fisher_task_8x128_distilled_offset_lr3e-3", "mlpallg_task_8x128_distilled_offset_lr3e-3", "mlpallg_c4_8x128_distilled_offset_lr3e-3", "mlpallg_task_distilled_offset_lr3e-3", "mlpallg_c4_distilled_offset_lr3e-3", "mlpallg_distilled_offset_lr3e-3_topk256", "mlpallg_distilled_offset_lr3e-3_drop0.2",
          "mlpallg_distilled3e-5_offset_lr3e-3", "mlpg_distilled_offset_lr3e-3", "mlpallg_distilled_offset_lr3e-3", "mlpallg_distilled_offset_lr3e-3_anchor",
          "mlpallg_distilled_offset_lr5e-3_anchor", "allg_distilled_offset_lr2e-3", "mlpall_distilled_offset_lr3e-3", "lora_rows162_lr2e-3", "mlp_only_rows162", "mlp_only_offset", "mlp_only_offset_lr2e-3",
          "mlp_only_offset_calibrated", "mlp_distilled_rows162", "mlp_distilled_offset", "mlp_distilled_offset_lr2e-3",
          "mlp_distilled_offset_lr3e-3", "mlp_distilled_offset_lr5e-3", "mlp_distilled_offset_lr3e-3_calibrated",
          "mlp_distilled_offset_lr5e-3_calibrated", "mlp_distilled_offset_lr5e-3_anchor",
          "mlp_distilled_offset_lr5e-3_anchor10", "mlp_distilled_offset_lr8e-3_anchor", "distilled85_offset_lr5e-3_anchor",
          "mlp_distilled_offset_lr6e-3_anchor", "distilled85_offset_lr2e-3_anchor",
          "distilled85_rows162", "distilled85_offset", "distilled85_offset_lr2e-3", *SAME_ADAPTER_SUBSET}
PRUNE_EXTRA = {"mlp0.62": ["--method", "taylor", "--ratio", "0.62", "--attn-ratio", "0", "--layers", q.LAYERS],
               # --allocate global: the same 22.9 k channels removed, ranked across the layers (in 4:28, or in all 30 layers)
               "mlp0.62g": ["--method", "taylor", "--ratio", "0.62", "--attn-ratio", "0", "--layers", q.LAYERS, "--allocate", "global"],
               "mlpall0.4965g": ["--method", "taylor", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30", "--allocate", "global"],
               "all0.7335g": ["--method", "taylor", "--ratio", "0.7335", "--attn-ratio", "0.34", "--layers", "0:30", "--allocate", "global"],
               "mlpall0.4965": ["--method", "taylor", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30"],  # the ablation: uniform
               # stop 15: Taylor scores on 64 x 256 tokens of the training rows (`--calib-data` renders them as training does; {dev}:
               # the dev folder; the runs recorded read the same rows pre-rendered to {"text"}, the same calibration sha256) or of C4
               **{f"mlpall0.4965g{c}": ["--method", "taylor", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30", "--allocate",
                                        "global", "--calib-data", f, "--calib-samples", "64", "--calib-seq-len", "256"]
                  for c, f in (("_task", "{dev}/train_mix.jsonl"), ("_c4", f"{q.DATA}/corpus/c4_demo.jsonl"))},
               **{f"mlpall0.4965g{c}_8x128": ["--method", "taylor", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30", "--allocate",
                                         "global", "--calib-data", f] for c, f in (("_task", "{dev}/train_mix.jsonl"),
                                                                                   ("_c4", f"{q.DATA}/corpus/c4_demo.jsonl"))},
               # stop 16: the same channel budget ranked by --method fisher
               "mlpall0.4965gF": ["--method", "fisher", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30", "--allocate", "global"],
               "all0.7335gF_task_8x128": ["--method", "fisher", "--ratio", "0.7335", "--attn-ratio", "0.34", "--layers", "0:30", "--allocate",
                                          "global", "--calib-data", "{dev}/train_mix.jsonl"],
               "mlpall0.4965gF_task_8x128": ["--method", "fisher", "--ratio", "0.4965", "--attn-ratio", "0", "--layers", "0:30", "--allocate",
                                             "global", "--calib-data", "{dev}/train_mix.jsonl"]}


mixture_rows = q.mixture_rows


def dev_data(work: Path) -> dict:
    d = work / "dev"
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "indomain_dev.jsonl").exists():
        mixture_rows(d / "indomain_dev.jsonl", slice(3100, 3133), slice(4100, 4133), slice(3000, 3033))
        ood = json.loads((q.DATA / "instruct/alpaca_en_demo.json").read_text())[500:600]
        (d / "alpaca_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ood))
    cal = q.calibration_rows(d)  # see the docstring: rows no training, dev or test set uses
    if not (d / "train_mix.jsonl").exists():  # the SUBSET variants' 162 training rows, sources interleaved (transfer_dev.py)
        q.interleaved_rows(d / "train_mix.jsonl", SUBSET_ROWS)
    return {"ppl": {"in_domain": str(d / "indomain_dev.jsonl"), "alpaca_ood": str(d / "alpaca_dev.jsonl")},
            **cal, "general_c4": f"{q.DATA}/corpus/c4_demo.jsonl[:32]", "train_mix": str(d / "train_mix.jsonl")}


def prune_args(work: Path, key: str) -> list[str]:
    """`loram prune` arguments of a pruned-model key ({dev}: the dev folder, where the training-row files are)."""
    return [a.format(dev=work / "dev") for a in PRUNE_EXTRA.get(key) or q.prune_args(key)]


def adapter_of(work: Path, name: str, key: str | None, extra: list[str] | None, data: dict) -> Path | None:
    """The (pruned-shape) adapter of a variant: quality_smollm2's own (adapter_ROW) when it trained the same thing."""
    if extra is None:
        return None
    if name in SUBSET:
        data = dict(data, train=[f"{f.split('[')[0]}[:{SUBSET_ROWS}]" for f in data["train"]])
    if key is None:
        name = SAME_ADAPTER.get(name, name)
        out = "adapter_lora" if name == "lora" else f"adapter_dev_{name}"
        q.train(work, out, "smollm2", extra, data)
        return work / out
    if not extra and name not in SUBSET and (key in q.ROWS or key.startswith("stru0.")):  # a benchmark row or sweep point
        if not (work / f"adapter_{key}" / "train_report.json").exists():
            raise SystemExit(f"adapter_{key} not trained yet: run benchmarks/quality_smollm2.py (its row or sweep point) first")
        return work / f"adapter_{key}"
    if key.startswith(("align:", "distill:")):  # align:PRUNED:LR[:STEPS] - another alignment budget; distill:...: align --distill
        how, src, lr, *steps = key.split(":")
        flags = (("--distill",) if how == "distill" else ()) + (("--steps", steps[0]) if steps else ())
        pruned, _ = q.align(work, q.prune(work, src, prune_args(work, src)), lr,
                            work / f"{'aligned' if how == 'align' else 'distilled'}_{src}_lr{lr}{'_steps' + steps[0] if steps else ''}", flags)
    else:
        pruned = q.prune(work, key, prune_args(work, key))
    name = SAME_ADAPTER.get(name, name)
    # the original's top-k of the subset's rows: the same for every student (its key has no student in it), so shared
    extra = [x.format(offset_cache=work / "offset-cache-rows162", anchor=ANCHOR) for x in extra]
    q.train(work, f"adapter_dev_{name}", str(pruned), extra, data)
    return work / f"adapter_dev_{name}"


def derive(work: Path, trained: Path, plain: Path, served: Path, rec_extra: list[str], dev: dict) -> None:
    """The served adapter of a DERIVED recover extra, made from ``plain`` (the recovered adapter, or full LoRA's own)."""
    how, arg = rec_extra
    if how == "keep":
        transfer_dev.keep_roles(plain, served, arg.split(","))
    elif how == "restrict":  # arg: the pruned folder (in WORK) whose plan's support the update is cut to
        transfer_dev.restrict_to_plan(plain, work / arg, served)
    elif how == "scale":
        transfer_dev.write_copy(plain, served, lora_alpha_factor=float(arg))  # the update B A alpha/r x arg
    else:  # transfer: needs the pruned model the adapter was trained on
        pruned = Path(json.loads((trained / "loram_adapter.json").read_text())["trained_on"])
        rec = transfer_dev.transfer(plain, pruned, served, dev["train_mix"], 96, float(arg))
        (work / f"transfer_{served.name}.json").write_text(json.dumps(rec, indent=2))


def run(work: Path, name: str, data: dict, dev: dict, res: dict) -> None:
    what, key, extra, rec_extra = VARIANTS[name]
    trained = adapter_of(work, name, key, extra, data)
    served, reduction = trained, 1.0
    if trained is not None:
        plain = trained if key is None else work / f"{trained.name}_recovered"  # what `loram recover` makes without extras
        derived = rec_extra[:1] and rec_extra[0] in DERIVED
        if key is not None and (derived or not rec_extra) and not (plain / "adapter_config.json").exists():
            q.sh(["loram", "recover", str(trained), "--base", "smollm2", "-o", str(plain), "--overwrite"], work / f"recover_{plain.name}.log")
        served = work / f"{plain.name}_{name}" if rec_extra else plain
        if derived and not (served / "adapter_config.json").exists():
            derive(work, trained, plain, served, rec_extra, dev)
        elif rec_extra and not (served / "adapter_config.json").exists():  # extras that are `loram recover` flags
            q.sh(["loram", "recover", str(trained), "--base", "smollm2", "-o", str(served), "--overwrite",
                  *(x.format(**{k: dev[k] for k in ("calibrate", "general", "general128", "general_c4")}) for x in rec_extra)],
                 work / f"recover_{served.name}.log")
        if key is not None and key not in ("semi", "unst"):  # sparse models keep their shapes: no parameter reduction
            reduction = q.reduction(json.loads((trained / "train_report.json").read_text()), True)
    ev = q.evaluate(work / "dev", name, "smollm2", str(served) if served else None, dev, mc=False)
    res[name] = {"what": what, "in_domain": q.metric(ev, "ppl", "in_domain", "ppl"), "ood": q.metric(ev, "ppl", "alpaca_ood", "ppl"),
                 "reduction": round(reduction, 3)} | ({"reference": "lora_rows162"} if name in SUBSET else {})
    meta = served / "loram_adapter.json" if served else None
    cal = json.loads(meta.read_text()).get("calibration") if meta and meta.exists() else None
    tr = work / f"transfer_{served.name}.json" if served else None
    if tr and tr.exists():  # transfer_dev.transfer's record: how much A moved, and its CPU seconds
        res[name]["transfer"] = json.loads(tr.read_text())
    if cal:  # what --calibrate chose and what it cost (CPU seconds of the recovery's forward passes)
        res[name]["calibration"] = {k: cal.get(k) for k in ("scope", "scale", "layer_scales", "loss_at_1", "loss", "loss_at_0",
                                                            "rows", "scored_tokens", "passes", "seconds")}
        if cal.get("general"):  # --calibrate-general: the bound and the written adapter's general-text loss
            res[name]["calibration"]["general"] = {k: cal["general"][k] for k in ("loss_at_0", "bound", "loss", "binding")}


def mean_nonzero(rows: list) -> float:
    """Mean of the non-zero numbers in a list of numbers or of lists (inspect's maps mark pruned cells 0)."""
    xs = [x for r in rows for x in (r if isinstance(r, list) else [r]) if x]
    return sum(xs) / max(1, len(xs))


def update_norms(work: Path, adapters: dict[str, str]) -> dict:
    """Mean per-head (q,k,v,o) and per-layer mean-row (gate,up,down) update norms of each recovered
    adapter (`loram inspect`, zeros excluded), averaged over layers: how large the learned update is."""
    out = {}
    for name, folder in adapters.items():
        if not (work / folder / "adapter_config.json").exists():
            continue
        d = work / "dev" / f"inspect_{folder}"
        if not (d / "update_norms.json").exists():
            q.sh(["loram", "inspect", str(work / folder), "-o", str(d)], work / "dev" / f"inspect_{folder}.log")
        j = json.loads((d / "update_norms.json").read_text())
        out[name] = {"attn_head": {k: round(mean_nonzero(v), 4) for k, v in j["heads"].items()},
                     "mlp_row": {k: round(mean_nonzero(v), 5) for k, v in j["mlp_mean_row_norm"].items()}}
    return out


def norms_table(norms: dict) -> list[str]:
    if "lora" not in norms:
        return []
    ref = norms["lora"]
    lines = ["", "Update norms relative to full LoRA's (`loram inspect`, zeros excluded, mean over layers and heads):", "",
             "| adapter | q | k | v | o | gate | up | down |", "|---|---|---|---|---|---|---|---|"]
    for name, n in norms.items():
        cells = [n["attn_head"][k] / ref["attn_head"][k] for k in ("q", "k", "v", "o")]
        cells += [n["mlp_row"][k] / ref["mlp_row"][k] for k in ("gate", "up", "down")]
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}x" for c in cells) + " |")
    return lines


def table(res: dict, command: str, norms: dict | None = None) -> str:
    b, l_ = res.get("base"), res.get("lora")
    lines = ["# LoRAM-Stru investigation on a dev split (SmolLM2-135M-Instruct; never the test sets)", "",
             f"Commands: {command}. Dev split: see the docstring of benchmarks/quality_dev.py. Every row served as the original "
             "model + recovered adapter; 40 steps x 4 x 256 tokens, seed 0, unless the row says otherwise.", "",
             "| variant | what | param. reduction | in-domain dev ppl | share of full LoRA's gain | OOD dev ppl | OOD vs base |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        ref = res.get(r.get("reference", "lora"), l_)  # the full LoRA trained on the same rows
        gain = (b["in_domain"] - r["in_domain"]) / (b["in_domain"] - ref["in_domain"]) if b and ref and r["in_domain"] else None
        ood = (r["ood"] / b["ood"] - 1) if b and r["ood"] else None
        lines.append(f"| {name} | {r['what']} | {r['reduction']:.2f}x | {q.fmt(r['in_domain'], '.3f')} | "
                     f"{'-' if gain is None else f'{gain:.0%}'} | {q.fmt(r['ood'], '.3f')} | {'-' if ood is None else f'{ood:+.1%}'} |")
    return "\n".join(lines + norms_table(norms or {})) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--work", default="runs/bench-quality")
    a = ap.parse_args()
    if not q.DATA.is_dir():
        sys.exit(f"{q.DATA} not found: this benchmark needs the shared data (../shared/data)")
    work = q.ROOT / a.work
    data, dev = q.prepare_data(work), dev_data(work)
    out = q.RESULTS / "quality_dev.json"
    prev = json.loads(out.read_text()) if out.exists() else {}
    res, old_norms = prev.get("variants", {}), prev.get("update_norms", {})
    # the results accumulate over invocations (each reuses the cached stages): so does the record of the commands
    command = (prev.get("command", "") + f"; on {time.strftime('%Y-%m-%d')}: " if prev.get("command") else "") + \
        "`OMP_NUM_THREADS=1 python benchmarks/quality_dev.py " + " ".join(sys.argv[1:]) + "`"
    for name in filter(None, a.only.split(",")):
        t0 = time.time()
        print(name, flush=True)
        run(work, name, data, dev, res)
        print(f"  {time.time() - t0:.0f} s: {res[name]}", flush=True)
        res = {k: res[k] for k in VARIANTS if k in res}
        write(out, command, res, old_norms)  # the norms measured earlier stay in the tables
    norms = {**old_norms, **update_norms(work, NORM_ADAPTERS)}  # a new --work holds only the new adapters
    write(out, command, res, norms)
    return 0


def write(out: Path, command: str, res: dict, norms: dict) -> None:
    out.write_text(json.dumps({"command": command, "variants": res, "update_norms": norms}, indent=2) + "\n")
    (q.RESULTS / "quality_dev.md").write_text(table(res, command, norms))


if __name__ == "__main__":
    sys.exit(main())
