"""`loram prune --compensate`: least-squares refit of the kept o/down columns (loram.prune.compensate)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loram.families import geometry, layer_module
from loram.io import load_tokenizer
from loram.loading import load_pruned
from loram.prune import prune
from loram.prune.compensate import _grams, compensated_columns
from loram.prune.structured import calibration_batches
from loram.prune_plan import PLAN_FILE, PrunePlan
from loram.testing import save_tiny

CAL = dict(calib_samples=4, calib_seq_len=32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny GQA base pruned by magnitude (needs no calibration) with and without --compensate."""
    d = tmp_path_factory.mktemp("comp")
    base = save_tiny(d / "base", "llama-gqa", seed=2)
    prune(str(base), d / "plain", method="magnitude", ratio=0.5, **CAL)
    prune(str(base), d / "comp", method="magnitude", ratio=0.5, compensate=True, **CAL)
    return base, d / "plain", d / "comp"


def _calib(base):
    return calibration_batches(load_tokenizer(str(base)), None, CAL["calib_samples"], CAL["calib_seq_len"])[0]


def test_refit_is_the_least_squares_optimum():
    torch.manual_seed(0)
    X = torch.randn(300, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)  # correlated inputs
    W = torch.randn(10, 24, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 11, 15, 16, 20, 23])
    G = X.t() @ X
    exact = compensated_columns(W, G, keep, damp=0.0).double()
    ref = torch.linalg.lstsq(X[:, keep], X @ W.t()).solution.t()  # min ||X W^T - X_K W'^T||
    assert torch.allclose(exact, ref, rtol=1e-4, atol=1e-4)
    # the default (damped) refit solves the normal equations of the ridge towards the slice, and never
    # does worse than the plain slice on the calibration activations
    damped = compensated_columns(W, G.float(), keep, damp=0.01).double()
    GKK = G[keep][:, keep]
    lam = 0.01 * torch.diagonal(GKK).mean()
    lhs = damped @ (GKK + lam * torch.eye(len(keep), dtype=G.dtype))
    assert torch.allclose(lhs, W @ G[:, keep] + lam * W[:, keep], rtol=1e-4, atol=1e-2)
    err = lambda Wk: (X @ W.t() - X[:, keep] @ Wk.t()).pow(2).sum()  # noqa: E731
    assert err(ref) <= err(damped) < err(W[:, keep])


def test_pruned_layers_reproduce_the_original_projection(pair):
    """On the calibration activations of the original model, each compensated o/down output error is
    below the plain slice's and equals the least-squares optimum (torch.linalg.lstsq on the same X)."""
    base, plain, comp = pair
    orig = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    plan = PrunePlan.load(comp)
    assert PrunePlan.load(plain).pruned == plan.pruned  # same channels: only the weights differ
    g = geometry(orig.config)
    mp, mc = load_pruned(plain), load_pruned(comp)
    targets = [(i, r, idx) for i, r, idx in plan.pruned_modules(g) if r in ("o", "down")]
    assert {r for _, r, _ in targets} == {"o", "down"}
    xs = {}
    hooks = [layer_module(orig, i, r).register_forward_hook(lambda _m, a, _o, k=(i, r): xs.setdefault(k, []).append(a[0]))
             for i, r, _ in targets]
    with torch.no_grad():
        for ids in _calib(base):
            orig(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for i, r, idx in targets:
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs[(i, r)]]).double()
        W = layer_module(orig, i, r).weight.detach().double()
        err = lambda Wk: float((X @ W.t() - X[:, idx] @ Wk.t()).pow(2).sum())  # noqa: E731,B023
        wp, wc = layer_module(mp, i, r).weight.detach().double(), layer_module(mc, i, r).weight.detach().double()
        assert torch.equal(wp, W[:, idx])  # the plain prune is the slice
        # the optimum of the damped problem min ||X W^T - X_K W'^T||^2 + lam ||W' - W_K||^2 (the plan's damp),
        # by torch.linalg.lstsq on the stacked system [X_K; sqrt(lam) I] W'^T = [X W^T; sqrt(lam) W_K^T]
        lam = plan.compensation["damp"] * float(X[:, idx].pow(2).sum(0).mean())
        eye = torch.eye(len(idx), dtype=X.dtype) * lam ** 0.5
        opt = torch.linalg.lstsq(torch.cat([X[:, idx], eye]), torch.cat([X @ W.t(), eye @ W[:, idx].t()])).solution.t()
        assert torch.allclose(wc, opt, rtol=1e-3, atol=1e-4), (i, r, float((wc - opt).abs().max()))
        assert err(wc) < err(wp), (i, r)
        for role in ("q", "k", "gate", "up"):  # rows are dropped as before
            assert torch.equal(layer_module(mc, i, role).weight, layer_module(mp, i, role).weight)


def test_whole_model_logits_closer_to_the_original(pair):
    base, plain, comp = pair
    orig = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    mp, mc = load_pruned(plain), load_pruned(comp)
    kl = {}
    with torch.no_grad():
        for name, m in (("plain", mp), ("comp", mc)):
            tot = 0.0
            for ids in _calib(base):
                p = torch.log_softmax(orig(input_ids=ids).logits, -1)
                q = torch.log_softmax(m(input_ids=ids).logits, -1)
                tot += float(torch.sum(p.exp() * (p - q)))
            kl[name] = tot
    assert kl["comp"] < kl["plain"], kl


def test_plan_records_it_and_build_refuses(pair, capsys):
    from loram.cli import main

    base, plain, comp = pair
    raw = json.loads((comp / PLAN_FILE).read_text())
    assert raw["compensation"]["method"] == "least-squares" and raw["compensation"]["calibration"]["samples"] == CAL["calib_samples"]
    assert "compensation" not in json.loads((plain / PLAN_FILE).read_text())
    pc, pp = PrunePlan.load(comp), PrunePlan.load(plain)
    assert pc.id != pp.id and pc.weights_digest() != pp.weights_digest()  # the weights are not the slices
    assert pc.calibration is None  # magnitude's plan records no scoring calibration; compensation holds it
    out = comp.parent / "rebuilt"
    capsys.readouterr()
    assert main(["build", str(base), "-o", str(out), "--plan", str(comp)]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "--compensate" in errors[0] and "use the pruned folder it wrote" in errors[0], errors
    assert not out.exists()


def test_train_and_recover_on_a_compensated_folder(pair, tmp_path, alpaca_file):
    """Recovery is unchanged: the adapter gets the original's shapes and stock PEFT loads it."""
    import warnings

    from peft import PeftModel

    from loram.recover import recover
    from loram.train import TrainConfig, train

    base, _plain, comp = pair
    train(comp, tmp_path / "adapter", TrainConfig(data=[str(alpaca_file)], steps=2, lr=1e-2, micro_batch=2))
    recover(tmp_path / "adapter", base, tmp_path / "rec")
    orig = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = geometry(orig.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing/unexpected keys
        pm = PeftModel.from_pretrained(orig, tmp_path / "rec")  # a size mismatch would raise
    downs = [m for n, m in pm.named_modules() if n.endswith("down_proj") and hasattr(m, "lora_A")]
    assert downs and all(m.lora_A["default"].weight.shape[1] == g.intermediate for m in downs)


def test_grams_are_collected_on_the_original_inputs(pair):
    """The Gram of a projection is X^T X of the original model's input to it (one pass, hooks removed)."""
    base, _plain, comp = pair
    orig = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    plan = PrunePlan.load(comp)
    i = plan.layers[0]
    batches = _calib(base)
    grams = _grams(orig, [(i, "down", None)], batches)
    seen = []
    h = layer_module(orig, i, "down").register_forward_hook(lambda _m, a, _o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for ids in batches:
            orig(input_ids=ids, use_cache=False)
    h.remove()
    X = torch.cat(seen)
    assert grams[(i, "down")].tokens == X.shape[0]
    assert torch.allclose(grams[(i, "down")].H, X.t() @ X, rtol=1e-4, atol=1e-4)
    assert not layer_module(orig, i, "down")._forward_hooks


def test_streamed_compensation_equals_in_memory(pair, tmp_path, capsys):
    """A budget below the in-memory peak streams by itself; the refit is the same (one original layer at a
    time, over the same calibration hidden states) up to float summation order."""
    from loram.cli import main
    from loram.weights import Weights

    base, _plain, comp = pair
    out = tmp_path / "streamed"
    assert main(["prune", str(base), "-o", str(out), "--method", "magnitude", "--ratio", "0.5", "--compensate",
                 "--calib-samples", str(CAL["calib_samples"]), "--calib-seq-len", str(CAL["calib_seq_len"]),
                 "--max-memory", "0.0001"]) == 0
    assert "streaming layer by layer" in capsys.readouterr().err
    ps, pm = PrunePlan.load(out), PrunePlan.load(comp)
    assert ps.compensation == pm.compensation and ps.weights_digest() == pm.weights_digest()
    ws, wm = Weights(out), Weights(comp)
    assert set(ws.names) == set(wm.names)
    for k in wm.names:
        a, b = ws.get(k), wm.get(k)
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-4, atol=1e-5), k
    load_pruned(out)  # binds: the plan's digest is the one the streamed writer recorded


def test_damp_is_recorded_and_used(pair, tmp_path):
    """--compensate-damp D: the plan records D, and a smaller D fits the calibration activations closer."""
    from loram.weights import Weights

    base, plain, comp = pair
    prune(str(base), tmp_path / "d", method="magnitude", ratio=0.5, compensate=True, compensate_damp=0.01, **CAL)
    plan = PrunePlan.load(tmp_path / "d")
    assert plan.compensation["damp"] == 0.01 and PrunePlan.load(comp).compensation["damp"] == 1.0
    assert plan.weights_digest() != PrunePlan.load(comp).weights_digest()
    i = plan.layers[0]
    name = f"model.layers.{i}.mlp.down_proj.weight"
    orig = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    xs = []
    h = layer_module(orig, i, "down").register_forward_hook(lambda _m, a, _o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for ids in _calib(base):
            orig(input_ids=ids, use_cache=False)
    h.remove()
    X, W = torch.cat(xs).double(), layer_module(orig, i, "down").weight.detach().double()
    idx = plan.kept_index(i, "down", geometry(orig.config))
    err = {k: float((X @ W.t() - X[:, idx] @ Weights(f).get(name).double().t()).pow(2).sum())
           for k, f in (("slice", plain), ("1", comp), ("0.01", tmp_path / "d"))}
    assert err["0.01"] < err["1"] < err["slice"], err
