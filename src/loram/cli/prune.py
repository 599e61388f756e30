"""loram prune MODEL -o OUT --method taylor --ratio 0.5"""

from __future__ import annotations

from .common import ATTN_RATIO, COUNT, RATIO, SEED, SEQ_LEN, add_out, add_verify_base, table


def add(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (structured, or sparse with --sparsity) and write a pruned model folder + plan")
    p.add_argument("model", help="HF model folder, .gguf file, hub id, or the built-in alias 'smollm2'")
    add_out(p, "pruned model folder")
    p.add_argument("--method", default="taylor",
                   help="structured: random | magnitude | taylor (default); sparse: sparsegpt | wanda | magnitude with --sparsity")
    p.add_argument("--sparsity", default=None,
                   help="non-structured pruning: unstructured | N:M (N of every M input weights kept, e.g. 2:4); "
                        "without it pruning is structured")
    p.add_argument("--ratio", type=RATIO, default=None,
                   help="fraction removed per pruned layer, 0<R<1 (default 0.5): MLP channels, or weights with --sparsity "
                        "unstructured; implied by N:M")
    p.add_argument("--attn-ratio", type=ATTN_RATIO, default=None, help="fraction of KV groups removed (default: --ratio; 0 keeps attention)")
    p.add_argument("--layers", default=None, help="START:END layers to prune (default: skip first 4 and last 2)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--calib-data", default=None, help="taylor/sparsegpt/wanda: .txt or .jsonl {text} file (default: built-in text)")
    p.add_argument("--calib-samples", type=COUNT, default=8, help="taylor/sparsegpt/wanda: number of calibration sequences")
    p.add_argument("--calib-seq-len", type=SEQ_LEN, default=128, help="taylor/sparsegpt/wanda: tokens per calibration sequence")
    add_verify_base(p, record=True)
    p.set_defaults(func=run)


def run(a) -> int:
    from ..prune import prune

    r = prune(a.model, a.out, method=a.method, ratio=a.ratio, attn_ratio=a.attn_ratio, layers=a.layers, seed=a.seed,
              calib_data=a.calib_data, calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len, overwrite=a.overwrite,
              sparsity=a.sparsity, verify_base=a.verify_base)
    s, e = r.plan.layers
    if r.plan.kind == "sparse":
        sp = r.plan.sparse
        table([("method", f"{r.plan.method} ({sp['pattern']})"), ("layers", f"{s}:{e}"),
               ("sparsity of the targeted linears", f"{sp['sparsity']:.4f} (requested {sp['ratio']:g})"),
               ("parameters (shapes kept)", f"{r.params_original:,}"), ("non-zero parameters", f"{r.params_nonzero:,}"),
               ("time", f"{r.seconds:.1f} s"), ("peak RSS", f"{r.peak_rss_gb:.2f} GB"), ("written", r.out)], title="loram prune")
        return 0
    table([("method", r.plan.method), ("layers", f"{s}:{e}"), ("MLP / KV-group ratio", f"{r.plan.mlp_ratio} / {r.plan.attn_ratio}"),
           ("parameters original", f"{r.params_original:,}"), ("parameters pruned", f"{r.params_pruned:,}"),
           ("parameter reduction", f"{r.param_reduction:.2f}x"), ("time", f"{r.seconds:.1f} s"),
           ("peak RSS", f"{r.peak_rss_gb:.2f} GB"), ("written", r.out)], title="loram prune")
    return 0
