"""benchmarks/ood_noise.py's paired bootstrap: the point value is the two models' perplexity ratio, a model that is
better on every row by the same amount per token has no spread, and models scored on different tokens are refused."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def noise():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ood_noise", ROOT / "benchmarks" / "ood_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_point_is_the_perplexity_ratio(noise):
    base = [[-10.0, 5], [-30.0, 12], [-4.0, 3]]
    model = [[-9.0, 5], [-31.0, 12], [-3.5, 3]]
    ppl = lambda s: math.exp(-sum(x for x, _ in s) / sum(n for _, n in s))  # noqa: E731
    r = noise.paired(base, model, draws=200)
    assert r["point"] == pytest.approx(ppl(model) / ppl(base) - 1)
    assert r["ci95"][0] <= r["point"] <= r["ci95"][1] and r["rows"] == 3


def test_same_model_and_uniform_gain_have_no_spread(noise):
    base = [[-2.0 * n, n] for n in (4, 9, 1, 7)]
    same = noise.paired(base, base, draws=200)
    assert same["point"] == 0 and same["ci95"] == [0, 0] and same["p_worse"] == 0
    better = noise.paired(base, [[x + 0.1 * n, n] for x, n in base], draws=200)  # 0.1 nats per token better on every row
    assert better["ci95"][0] == pytest.approx(math.exp(-0.1) - 1) == pytest.approx(better["ci95"][1])
    assert better["p_worse"] == 0


def test_different_tokens_are_refused(noise):
    with pytest.raises(SystemExit, match="different tokens"):
        noise.paired([[-1.0, 2]], [[-1.0, 3]])
