"""How much of a perplexity difference between two models is noise of the 100-row test sets? (issue 18)

    OMP_NUM_THREADS=1 python benchmarks/ood_noise.py --work WORK --rows ROW[,ROW...]

quality_smollm2.py reports "OOD vs base" as one number per trained adapter: the Alpaca test rows' perplexity
under the original + recovered adapter over the base's. The goal asks it to be <= 0 on every seed; this script
says how far from 0 a measured value can fall by which rows happen to be in the set. Each row's response tokens
are scored once per model (the same formatting, truncation and batching as `loram eval --ppl ... --seq-len 256
--limit 100`; the per-model sums give back quality_smollm2.py's perplexities), then the rows are resampled with
replacement (a paired bootstrap: the same resampled rows for both models, 10 000 draws, seed 0):

    ratio - 1 = exp((sum loglik_base - sum loglik_model) / sum tokens) - 1  over the resampled rows

Reported per row of quality_smollm2.py: the point value, its 95 % interval, and the share of draws above 0 (the
model worse than the base). With --more, also on Alpaca rows 100:500, which no test, dev, --calibrate-general or
--anchor set reads (not a test set of the goals: a check of whether a test-set difference holds on other rows of the
same kind). Scores are cached in WORK/rowscores_*.json. Writes benchmarks/results/ood_noise.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_smollm2 as q  # noqa: E402

DRAWS, SEQ_LEN, LIMIT = 10_000, 256, 100


def row_scores(work: Path, name: str, adapter: str | None, sets: dict[str, tuple[str, int | None]]) -> dict:
    """{set: [[loglik, tokens], ...]} of one model, one pair per scored row of each set's (file, row limit) (cached; a
    set added later is scored alone)."""
    out = work / f"rowscores_{name}.json"
    res = json.loads(out.read_text()) if out.exists() else {}
    todo = {k: v for k, v in sets.items() if k not in res}
    if not todo:
        return res
    from loram.data.sources import read_rows
    from loram.eval import load_for_eval
    from loram.eval.ppl import instruction_sequences, pad_id
    from loram.eval.scoring import score_sequences

    model, tok = load_for_eval("smollm2", adapter)
    for key, (path, limit) in todo.items():
        seqs, _ = instruction_sequences(tok, read_rows(path, limit), SEQ_LEN)
        res[key] = [[s.loglik, s.tokens] for s in score_sequences(model, seqs, 8, pad_id(tok))]
    out.write_text(json.dumps(res))
    return res


def paired(base: list, model: list, draws: int = DRAWS, seed: int = 0) -> dict:
    """Point value, 95 % interval and P(> 0) of model's perplexity over base's, minus 1, under row resampling."""
    b, m = torch.tensor(base, dtype=torch.float64), torch.tensor(model, dtype=torch.float64)
    if not torch.equal(b[:, 1], m[:, 1]):
        raise SystemExit("the two models scored different tokens: not the same rows / tokenizer")
    diff, tokens = b[:, 0] - m[:, 0], b[:, 1]  # per row: loglik_base - loglik_model, scored tokens

    def ratio(idx):
        return torch.exp(diff[idx].sum(-1) / tokens[idx].sum(-1)) - 1

    point = float(ratio(torch.arange(len(diff))))
    idx = torch.randint(len(diff), (draws, len(diff)), generator=torch.Generator().manual_seed(seed))
    r = ratio(idx)
    lo, hi = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"point": point, "ci95": [lo, hi], "p_worse": float((r > 0).double().mean()), "rows": len(diff)}


def table(res: dict) -> str:
    lines = ["# Is an OOD difference of a few tenths of a percent real? (paired bootstrap over the test rows)", "",
             f"Command: `{res['command']}` ({res['hardware']}; torch {res['versions']['torch']}, transformers "
             f"{res['versions']['transformers']}; {res['seconds']:.0f} s){'; ' + res['notes'] if res.get('notes') else ''}. {DRAWS} resamples of the rows (seed 0); the same "
             "rows for the model and the base in each draw.", "",
             "| row | set | vs base (point) | 95 % interval | share of draws worse than the base |", "|---|---|---|---|---|"]
    for row, sets in res["rows"].items():
        for key, s in sets.items():
            lines.append(f"| {row} | {key} | {s['point']:+.2%} | {s['ci95'][0]:+.2%} .. {s['ci95'][1]:+.2%} | {s['p_worse']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="quality_smollm2.py's --work (the rows' recovered adapters)")
    ap.add_argument("--rows", required=True, help="quality_smollm2.py rows, comma-separated")
    ap.add_argument("--more", action="store_true", help="also Alpaca rows 100:500 (alpaca_more): general instructions no other "
                    "set of the quality benchmarks reads, to see whether a difference on the 100 test rows holds on 400 others")
    a = ap.parse_args()
    work, t0 = Path(a.work).resolve(), time.time()
    data = q.prepare_data(work)
    # the test sets as quality_smollm2.py evaluates them (`loram eval --limit 100`)
    sets = {"alpaca_ood": (data["ppl"]["alpaca_ood"], LIMIT), "in_domain": (data["ppl"]["in_domain"], LIMIT)}
    if a.more:  # Alpaca rows no test, dev, --calibrate-general or --anchor set reads: 4x the OOD test set's rows
        more = work / "data" / "alpaca_100_500.jsonl"
        if not more.exists():
            more.write_text("".join(json.dumps(r) + "\n" for r in json.loads((q.DATA / "instruct/alpaca_en_demo.json").read_text())[100:500]))
        sets["alpaca_more"] = (str(more), None)
    base = row_scores(work, "base", None, sets)
    res = {"rows": {}}
    for row in a.rows.split(","):
        rec = work / f"adapter_{row}_recovered"
        if not (rec / "adapter_config.json").exists():
            raise SystemExit(f"{rec} not found: run quality_smollm2.py --rows {row} first (or its train and recover)")
        scores = row_scores(work, row, str(rec), sets)
        res["rows"][row] = {k: paired(base[k], scores[k]) for k in sets}
        print(row, json.dumps(res["rows"][row]), flush=True)
    import transformers

    threads = os.environ.get("OMP_NUM_THREADS")
    res |= {"command": (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/ood_noise.py " + " ".join(sys.argv[1:]),
            "seconds": time.time() - t0,
            "hardware": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    (q.RESULTS / "ood_noise.json").write_text(json.dumps(res, indent=2) + "\n")
    (q.RESULTS / "ood_noise.md").write_text(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
