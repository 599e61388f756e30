"""`loram recover --calibrate DATA --calibrate-general GENERAL`: the scale chosen on in-domain rows under a bound on
general-text loss (loram.calibrate: search with a Bound).

The search itself is tested on synthetic loss functions (exact, every grid point), the recovery end to end on
the tiny workspace of test_errors: the written adapter, loaded by stock PEFT, has the recorded losses and keeps
the general text at or under the bound. Error rows are in docs/reliability.md."""

import json

import pytest
import torch

from loram.adapter import read_meta
from loram.calibrate import GRID, GRID_GENERAL, Bound, CalibrationRequest, search
from loram.recover import recover
from test_calibrate import ROWS, SEQ, written_loss
from test_errors import fails, w  # noqa: F401  (w: test_errors's workspace fixture)


def synthetic(domain, general, layers=(0, 1, 2)):
    """score(scales, part) for losses that are sums over the modules' scales (None: outside the layers)."""
    calls = []

    def score(scales, part="domain"):
        calls.append(part)
        f = domain if part == "domain" else general
        return sum(f(k, s) for k, s in scales.items()), 7

    return score, calls, list(layers)


def test_search_without_a_bound_is_unchanged_by_the_refactor():
    score, calls, layers = synthetic(lambda k, s: (s - 0.7) ** 2, lambda k, s: s)
    scales, losses, tokens, loss = search(score, layers, "global")
    assert set(scales.values()) == {0.7} and tokens == 7 and loss == min(losses["global"].values())
    assert calls == ["domain"] * len(GRID)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_search_takes_the_best_candidate_that_keeps_the_bound(scope):
    """In-domain loss wants s = 1.5 everywhere; general-text loss grows with s (more in layer 2): the bound cuts the
    global s back; per layer, the slack the global s* leaves below the bound lets the harmless layers grow (one
    round of coordinate descent moves one layer at a time, so it cannot trade one layer's scale for another's)."""
    dom = lambda k, s: (s - 1.5) ** 2  # noqa: E731
    gen = lambda k, s: s * (3.0 if k == 2 else 0.1)  # noqa: E731
    score, calls, layers = synthetic(dom, gen)
    at_0 = score(dict.fromkeys([None, *layers], 0.0), "general")[0]
    bound = Bound(at_0 + 2.05, at_0)
    scales, losses, _, loss = search(score, layers, scope, GRID_GENERAL, bound)
    keys = [None, *layers]
    feasible = [s for s in GRID_GENERAL if score(dict.fromkeys(keys, s), "general")[0] <= bound.limit]
    best_global = min(feasible, key=lambda s: losses["global"][s])
    assert best_global == 0.6  # 3.3 x 0.6 = 1.98 <= 2.05; 0.7 would be 2.31
    assert bound.binding and sorted(losses["global"]) == list(GRID_GENERAL)
    assert bound.loss == pytest.approx(score(scales, "general")[0]) and bound.loss <= bound.limit
    assert loss == pytest.approx(score(scales)[0])
    if scope == "global":
        assert set(scales.values()) == {best_global}
        # only the candidates better in-domain than the choice were scored on general text, plus the choice
        assert sorted(bound.checked["global"]) == sorted([0.0] + [s for s in GRID_GENERAL if losses["global"][s] <= losses["global"][0.6]
                                                                  and s != 0.0])
    else:
        assert scales[2] == best_global < scales[0]  # layer 0 took the slack (0.6 -> 1.0: +0.04), layer 2 could not grow
        assert loss < losses["global"][best_global]
        # every layer's choice is the best of its candidates among those that keep the bound, given the others
        for i in layers:
            cand = losses["layers"][i]
            ok = [s for s in cand if score({**scales, i: s}, "general")[0] <= bound.limit]
            assert cand[scales[i]] == min(cand[s] for s in ok)


def test_search_with_a_slack_bound_is_the_unbounded_choice_on_the_wider_grid():
    score, _, layers = synthetic(lambda k, s: (s - 1.7) ** 2, lambda k, s: 0.0)
    at_0 = score(dict.fromkeys([None, *layers], 0.0), "general")[0]
    bound = Bound(at_0, at_0)
    scales, *_ = search(score, layers, "global", GRID_GENERAL, bound)
    assert set(scales.values()) == {1.6} and not bound.binding  # 1.6 and 1.8 tie: the one nearer s = 1


def test_request_grid_and_allowed_rise():
    assert CalibrationRequest("d").grid == GRID
    r = CalibrationRequest("d", general="g", tolerance=1.0)
    assert r.grid == GRID_GENERAL and r.allowed_rise == pytest.approx(torch.log1p(torch.tensor(0.01)).item())
    assert CalibrationRequest("d", general="g").allowed_rise == 0.0


@pytest.fixture(scope="module")
def general(w):  # noqa: F811
    """General text: rows unlike the in-domain additions (the tiny adapter is random, so it may help or hurt)."""
    f = w.root / "general.jsonl"
    words = ["the", "river", "ran", "past", "old", "mills", "and", "quiet", "fields", "towards", "a", "grey", "sea"]
    f.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(20))}) + "\n" for i in range(16)))
    return f


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_recover_with_general_keeps_its_loss_at_the_base(w, general, tmp_path, scope):  # noqa: F811
    out = recover(w.adapter, w.base, tmp_path / "g", calibrate=str(w.data), calibrate_rows=ROWS, seq_len=SEQ,
                  calibrate_general=str(general), calibrate_scope=scope)
    rec = read_meta(out)["calibration"]
    g = rec["general"]
    assert rec["grid"] == list(GRID_GENERAL) and g["tolerance_pct"] == 0.0 and g["bound"] == g["loss_at_0"]
    assert g["rows"] == ROWS and g["data"] == str(general)
    # stock PEFT on the written adapter: the recorded in-domain loss, and general text no worse than the base's
    assert written_loss(w.base, out, w.data) == pytest.approx(rec["loss"], rel=1e-6, abs=1e-7)
    got = written_loss(w.base, out, general)
    assert got == pytest.approx(g["loss"], rel=1e-6, abs=1e-7) and got <= g["bound"] + 1e-6
    plain = written_loss(w.base, w.recovered, general)  # the plain recovery (s = 1)
    assert g["loss_at_0"] != pytest.approx(plain)  # the update does change the general text's loss
    losses = {float(s): v for s, v in rec["losses"].items()}
    checked = {float(s): v for s, v in g["checked"]["global"].items()}
    # every candidate better in-domain than the global choice was scored on general text and broke the bound
    for s, v in losses.items():
        if v < losses[rec["scale"]]:
            assert checked[s] > g["bound"], s


def test_recover_with_a_loose_tolerance_is_the_unbounded_choice(w, general, tmp_path):  # noqa: F811
    out = recover(w.adapter, w.base, tmp_path / "t", calibrate=str(w.data), calibrate_rows=ROWS, seq_len=SEQ,
                  calibrate_general=str(general), calibrate_tolerance=1e6)
    rec = read_meta(out)["calibration"]
    losses = {float(s): v for s, v in rec["losses"].items()}
    assert not rec["general"]["binding"] and rec["loss"] == min(losses.values())
    assert sorted(rec["general"]["checked"]["global"]) == sorted({"0.0", str(rec["scale"])})  # one extra pass at most


def test_recover_with_general_streamed_is_the_same(w, general, tmp_path, capsys):  # noqa: F811
    kw = dict(calibrate=str(w.data), calibrate_rows=ROWS, seq_len=SEQ, calibrate_general=str(general))
    a = read_meta(recover(w.adapter, w.base, tmp_path / "m", **kw))["calibration"]
    b = read_meta(recover(w.adapter, w.base, tmp_path / "s", max_memory=0.00001, **kw))["calibration"]
    assert b["streamed"] and b["scale"] == a["scale"]
    assert b["general"]["loss"] == pytest.approx(a["general"]["loss"], rel=1e-5)


def test_cli_prints_the_general_bound(w, general, tmp_path, capsys):  # noqa: F811
    from loram.cli import main

    rc = main(["recover", str(w.adapter), "--base", str(w.base), "-o", str(tmp_path / "c"), "--calibrate", str(w.data),
               "--calibrate-rows", "4", "--seq-len", "32", "--calibrate-general", str(general), "--calibrate-tolerance", "0.5"])
    assert rc == 0
    rec = read_meta(tmp_path / "c")["calibration"]
    assert rec["general"]["tolerance_pct"] == 0.5
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("calibrated")][0]
    assert f"general text {rec['general']['loss']:.4f} vs base {rec['general']['loss_at_0']:.4f}" in line and "+0.5 % ppl" in line


def test_general_rows_apart_from_the_in_domain_rows(w, general, tmp_path):  # noqa: F811
    """--calibrate-general-rows: GENERAL's own row count (the in-domain rows keep --calibrate-rows)."""
    out = recover(w.adapter, w.base, tmp_path / "r", calibrate=str(w.data), calibrate_rows=4, seq_len=SEQ,
                  calibrate_general=str(general), calibrate_general_rows=16)
    rec = read_meta(out)["calibration"]
    assert rec["rows"] == 4 and rec["general"]["rows"] == 16
    assert written_loss(w.base, out, general, rows=16) == pytest.approx(rec["general"]["loss"], rel=1e-6, abs=1e-7)


def test_calibrate_general_rows_without_general(capsys, w):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data, "--calibrate-general-rows", "8",
          expect="--calibrate-general-rows only applies with --calibrate-general GENERAL", out=w.root / "o")


def test_calibrate_general_rows_too_many(capsys, w, general):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data, "--calibrate-rows", "4",
          "--calibrate-general", general, "--calibrate-general-rows", "17",
          expect="has 16 usable rows but --calibrate-general-rows asks for 17: give more general-text rows or lower "
                 "--calibrate-general-rows", out=w.root / "o")


def test_calibrate_tolerance_without_general(capsys, w):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data, "--calibrate-tolerance", "1",
          expect="--calibrate-tolerance only applies with --calibrate-general GENERAL", out=w.root / "o")


def test_calibrate_general_without_calibrate(capsys, w, general):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate-general", general,
          expect="--calibrate-general only applies with --calibrate DATA", out=w.root / "o")


def test_calibrate_general_missing_file(capsys, w):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data, "--calibrate-rows", "4",
          "--calibrate-general", w.root / "nope.jsonl", expect="nope.jsonl does not exist", out=w.root / "o")


def test_calibrate_general_too_few_rows(capsys, w, general):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data, "--calibrate-rows", "16",
          "--calibrate-general", w.root / "d.jsonl[:8]",
          expect="--calibrate-general", out=w.root / "o")


def test_calibrate_tolerance_negative(capsys, w, general):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data, "--calibrate-general", general,
          "--calibrate-tolerance", "-1", expect="--calibrate-tolerance -1", out=w.root / "o")
