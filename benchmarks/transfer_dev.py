"""Issue 18 dev diagnostics on a recovered adapter (used by quality_dev.py's *_updates and *_transfer variants).

    python benchmarks/transfer_dev.py keep ADAPTER OUT q,k,v,o
    python benchmarks/transfer_dev.py transfer ADAPTER PRUNED OUT DATA [--rows 96] [--lam 0.01]
    python benchmarks/transfer_dev.py norms REFERENCE ADAPTER...
    python benchmarks/transfer_dev.py restrict ADAPTER PRUNED OUT
    python benchmarks/transfer_dev.py roles ADAPTER DATA GENERAL OUT.json SA,SM [SA,SM ...]

keep      a copy of a recovered adapter with only the updates of the named roles (the other lora_B zeroed):
          which modules carry the gain, and how well each part transfers.
restrict  a copy of a full-shape adapter with the entries PRUNED's plan removes zeroed (the rows / columns a LoRAM
          adapter for that plan can only recover as zeros): full LoRA restricted so bounds what any LoRAM
          adapter on that support could carry over, were it to learn full LoRA's update exactly.
norms     per role (q ... down), the sum over layers of ||B A||_F of each recovered ADAPTER over REFERENCE's.
roles     the loss of `recover --calibrate`'s rows (DATA) and `--calibrate-general`'s (GENERAL), 32 each, cut to 256
          tokens, on the original with the attention updates (q,k,v,o) x SA and the MLP updates (gate,up,down) x SM:
          does one scale per role group trade in-domain gain for general-text damage better than one global s?
          (loram.calibrate's Scorer; results kept in OUT.json, a pair already there is not scored again)
transfer  input-matched transfer, a prototype (not a loram feature): the pruned model's modules read other
          inputs than the original's (its residual stream lacks the pruned channels' contributions), so each
          recovered lora_A is re-fitted on the ORIGINAL's inputs x_o to give what it gave on the pruned model's
          inputs x_p for the same tokens, with a ridge pull towards the adapter as trained:

              A' = argmin E||A' x_o - A x_p||^2 + lam ||A' - A||^2_C  =  (A C_po + A R)(C_oo + R)^-1
              C_po = E[x_p x_o^T], C_oo = E[x_o x_o^T], R = lam * mean(diag C_oo) * I

          lora_B, r and alpha are untouched (a standard PEFT adapter); where x_p = x_o (layers before the pruned
          range) A' = A exactly. Statistics: one forward of both models over DATA's first --rows rows (formatted
          as training formats them), one per distinct module input (q/k/v share one, gate/up one), cached beside
          OUT. In memory (fp32) only: a diagnostic for the 135M model, not the streamed machinery.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"


def write_copy(src: Path, out: Path, tensors: dict | None = None, lora_alpha_factor: float = 1.0) -> None:
    """``out``: a copy of adapter ``src`` with ``tensors`` as its weights and/or lora_alpha scaled, renamed into place whole."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    if tensors is not None:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    if lora_alpha_factor != 1.0:
        cfg = json.loads((tmp / "adapter_config.json").read_text())
        if cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
            raise SystemExit("scaling an adapter with alpha/rank patterns is not supported here")
        cfg["lora_alpha"] = cfg["lora_alpha"] * lora_alpha_factor
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)


def keep_roles(src: Path, out: Path, roles: list[str]) -> None:
    tensors = load_file(src / WEIGHTS)
    for k, v in tensors.items():
        if "lora_B" in k and not any(f".{r}_proj." in k for r in roles):
            tensors[k] = torch.zeros_like(v)
    write_copy(src, out, tensors)


def restrict_to_plan(src: Path, pruned_dir: Path, out: Path) -> None:
    """``out``: full-shape adapter ``src`` with every entry a pruned model of ``pruned_dir``'s plan could not hold set to 0
    (its pruned rows / columns): the most of ``src``'s update a LoRAM adapter with that support can carry over."""
    from loram.prune_plan import PrunePlan
    from loram.recover import recover_tensors
    from loram.testing import prune_tensors

    plan = PrunePlan.load(pruned_dir)
    config = plan.base_config()
    # prune then recover: the kept coordinates as they are, zeros elsewhere (recovery's own scatter)
    write_copy(src, out, recover_tensors(prune_tensors(load_file(src / WEIGHTS), plan, config), plan, config))


def update_norms(folder: Path) -> dict[str, float]:
    """{role: sum over layers of ||B A||_F} (the update without its alpha / r, which the compared adapters share)."""
    tensors, out = load_file(folder / WEIGHTS), {}
    for k, a in tensors.items():
        if ".lora_A." in k:
            role = k.split(".")[-3].removesuffix("_proj")
            out[role] = out.get(role, 0.0) + float((tensors[k.replace(".lora_A.", ".lora_B.")].float() @ a.float()).norm())
    return out


def shared_input(module: str) -> str:
    """Modules that read the same tensor share one statistic."""
    return module.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")


def input_stats(original, pruned, plan: dict, examples: list, modules: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{input: (C_po, C_oo)} summed over the examples' tokens (fp32); the pruned model's down_proj inputs are
    scattered to the original's channels (zeros at pruned ones), so A's recovered zero columns line up."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for model, who in ((original, "o"), (pruned, "p")):
        for name in sorted({shared_input(m) for m in modules}):
            def grab(mod, args, out, name=name, who=who):
                seen.setdefault(name, {})[who] = args[0].reshape(-1, args[0].shape[-1]).float()
            hooks.append(model.get_submodule(name).register_forward_hook(grab))
    stats: dict[str, list] = {}
    with torch.no_grad():
        for ids, _ in examples:
            t = torch.tensor([ids])
            original(t)
            pruned(t)
            for name, s in seen.items():
                xo, xp = s["o"], s["p"]
                if xp.shape[1] != xo.shape[1]:
                    full = torch.zeros_like(xo)
                    full[:, torch.tensor(plan[name.split(".")[2]]["mlp_keep"])] = xp
                    xp = full
                acc = stats.setdefault(name, [0, 0])
                acc[0] = acc[0] + xp.T @ xo
                acc[1] = acc[1] + xo.T @ xo
            seen.clear()
    for h in hooks:
        h.remove()
    return {k: (v[0], v[1]) for k, v in stats.items()}


def refit(a: torch.Tensor, c_po: torch.Tensor, c_oo: torch.Tensor, lam: float) -> torch.Tensor:
    """(A C_po + A R)(C_oo + R)^-1 in float64, R = lam * mean(diag C_oo) * I; C_oo is symmetric."""
    a, c_po, c_oo = a.double(), c_po.double(), c_oo.double()
    r = lam * c_oo.diagonal().mean() * torch.eye(c_oo.shape[0], dtype=torch.float64)
    return torch.linalg.solve(c_oo + r, (a @ c_po + a @ r).T).T


def transfer(src: Path, pruned_dir: Path, out: Path, data: str, rows: int, lam: float) -> dict:
    from loram.calibrate import CalibrationRequest, read_slice, tokenizer
    from loram.loading import load_model, load_pruned_model

    t0 = time.time()
    tensors = load_file(src / WEIGHTS)
    modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in tensors})
    cache = out.parent / f"transfer_stats_{pruned_dir.name}_{Path(data).stem}_{rows}.safetensors"
    if cache.exists():
        flat = load_file(cache)
        stats = {k: (flat[k + "|po"], flat[k + "|oo"]) for k in {x.split("|")[0] for x in flat}}
    else:
        meta = json.loads((src / "loram_adapter.json").read_text())
        examples = read_slice(tokenizer(meta["base_name"], meta), CalibrationRequest(data=data, rows=rows, seq_len=256)).examples
        original = load_model(meta["base_name"], dtype=torch.float32).eval()
        pm = load_pruned_model(pruned_dir)
        plan = json.loads((pruned_dir / "loram_plan.json").read_text())["pruned"]
        stats = input_stats(original, pm.model, plan, examples, modules)
        save_file({f"{k}|{t}": v[i].contiguous() for k, v in stats.items() for i, t in enumerate(("po", "oo"))}, cache)
    change = {}
    for m in modules:
        key = f"base_model.model.{m}.lora_A.weight"
        new = refit(tensors[key], *stats[shared_input(m)], lam)
        change[m] = float((new - tensors[key].double()).norm() / tensors[key].double().norm())
        tensors[key] = new.to(tensors[key].dtype)
    write_copy(src, out, tensors)
    by_role = {r: round(statistics.mean(c for m, c in change.items() if m.endswith(f"{r}_proj")), 3)
               for r in ("q", "k", "v", "o", "gate", "up", "down")}
    return {"rows": rows, "lam": lam, "relative_change_of_A": by_role, "seconds": round(time.time() - t0, 1)}


def role_losses(adapter: Path, data: str, general: str, out: Path, pairs: list[tuple[float, float]]) -> dict:
    from loram.adapter import read_meta
    from loram.calibrate import CalibrationRequest, Scorer, read_slice, scaled, tokenizer
    from loram.eval.ppl import perplexity_of

    req = CalibrationRequest(data, 32, None, 256, general)
    tok = tokenizer("smollm2", read_meta(adapter))
    sc = Scorer("smollm2", adapter, load_file(adapter / WEIGHTS), {p: read_slice(tok, req, p) for p in ("domain", "general")})
    res = json.loads(out.read_text()) if out.exists() else {}
    for sa, sm in pairs:
        if f"{sa:g},{sm:g}" in res:
            continue
        with torch.no_grad():
            for k, (param, b) in sc.b.items():
                param.copy_(scaled(b, sa if any(f".{r}_proj." in k for r in ("q", "k", "v", "o")) else sm).to(param.dtype))
        res[f"{sa:g},{sm:g}"] = {part: perplexity_of(sc.pm, sc.examples[part], sc.pad, 8).nll for part in ("domain", "general")}
        out.write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keep")
    k.add_argument("adapter", type=Path)
    k.add_argument("out", type=Path)
    k.add_argument("roles")
    t = sub.add_parser("transfer")
    t.add_argument("adapter", type=Path)
    t.add_argument("pruned", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("data")
    t.add_argument("--rows", type=int, default=96)
    t.add_argument("--lam", type=float, default=0.01)
    x = sub.add_parser("restrict")
    x.add_argument("adapter", type=Path)
    x.add_argument("pruned", type=Path)
    x.add_argument("out", type=Path)
    n = sub.add_parser("norms")
    n.add_argument("reference", type=Path)
    n.add_argument("adapters", type=Path, nargs="+")
    r = sub.add_parser("roles")
    r.add_argument("adapter", type=Path)
    r.add_argument("data")
    r.add_argument("general")
    r.add_argument("out", type=Path)
    r.add_argument("pairs", nargs="+")
    a = ap.parse_args()
    if a.cmd == "roles":
        pairs = [tuple(map(float, x.split(","))) for x in a.pairs]
        for key, v in role_losses(a.adapter, a.data, a.general, a.out, pairs).items():
            print(key, json.dumps(v))
    elif a.cmd == "keep":
        keep_roles(a.adapter, a.out, a.roles.split(","))
    elif a.cmd == "restrict":
        restrict_to_plan(a.adapter, a.pruned, a.out)
    elif a.cmd == "norms":
        ref = update_norms(a.reference)
        for folder in a.adapters:
            print(folder.name, json.dumps({r: round(v / ref[r], 2) for r, v in update_norms(folder).items()}))
    else:
        print(json.dumps(transfer(a.adapter, a.pruned, a.out, a.data, a.rows, a.lam)))


if __name__ == "__main__":
    main()
