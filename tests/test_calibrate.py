"""`loram recover --calibrate DATA`: the scale of the recovered update chosen on the original model (loram.calibrate).

The error tests are rows of the reliability table (docs/reliability.md), messages via test_errors.fails."""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from loram.adapter import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS, read_meta
from loram.calibrate import GRID, CalibrationRequest, is_lora_b, read_slice, scaled, tokenizer
from loram.eval.ppl import perplexity_of
from loram.recover import recover
from test_errors import fails, w  # noqa: F401  (w: test_errors's workspace fixture)

ROWS, SEQ = 12, 64


def written_loss(base, adapter, data, rows=ROWS):
    """Mean nll per scored token of ``adapter`` loaded by stock PEFT on ``base``, on the calibration rows."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer(base, read_meta(adapter))
    sl = read_slice(tok, CalibrationRequest(str(data), rows, None, SEQ))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing/unexpected keys: fail on any
        pm = PeftModel.from_pretrained(model, adapter).eval()
    return perplexity_of(pm, sl.examples, tok.pad_token_id, 8).nll


@pytest.fixture(scope="module")
def cal(w, tmp_path_factory):  # noqa: F811
    """The workspace's pruned adapter recovered with --calibrate, global and per layer."""
    root = tmp_path_factory.mktemp("cal")
    out = {}
    for scope in ("global", "layer"):
        out[scope] = recover(w.adapter, w.base, root / scope, calibrate=str(w.data), calibrate_rows=ROWS, calibrate_scope=scope,
                             seq_len=SEQ)
    return out


def test_calibrated_global_scale_minimises_the_calibration_loss(w, cal):  # noqa: F811
    rec = read_meta(cal["global"])["calibration"]
    losses = {float(s): v for s, v in rec["losses"].items()}
    assert sorted(losses) == list(GRID) and rec["scope"] == "global" and rec["rows"] == ROWS and rec["passes"] == len(GRID)
    assert rec["loss"] == min(losses.values()) == losses[rec["scale"]]
    assert rec["loss"] <= rec["loss_at_1"] and rec["loss"] <= rec["loss_at_0"]
    # the written adapter, loaded by stock PEFT, has the reported loss; s=1 is the uncalibrated adapter's
    assert written_loss(w.base, cal["global"], w.data) == pytest.approx(rec["loss"], rel=1e-6, abs=1e-7)
    assert written_loss(w.base, w.recovered, w.data) == pytest.approx(rec["loss_at_1"], rel=1e-6, abs=1e-7)
    assert rec["tokens"] > 0 and rec["scored_tokens"] > 0 and rec["seconds"] >= 0


def test_calibrated_adapter_is_the_plain_one_with_lora_b_scaled(w, cal):  # noqa: F811
    s = read_meta(cal["global"])["calibration"]["scale"]
    assert s != 1, "the random adapter should not be optimal as trained: pick another seed"
    got, plain = load_file(cal["global"] / ADAPTER_WEIGHTS), load_file(w.recovered / ADAPTER_WEIGHTS)
    assert set(got) == set(plain)
    for k, v in plain.items():
        expect = scaled(v, s) if is_lora_b(k) else v
        assert torch.equal(got[k], expect), k
        if is_lora_b(k):
            assert torch.equal(got[k], v * s), k  # fp32 adapter: exactly B x s
    assert json.loads((cal["global"] / ADAPTER_CONFIG).read_text()) == json.loads((w.recovered / ADAPTER_CONFIG).read_text())
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(w.base), cal["global"])
    loaded = {k.replace(".default", ""): t for k, t in pm.state_dict().items() if "lora_" in k}
    assert all(torch.equal(loaded[k], got[k]) for k in got)


def test_layer_scope_is_never_worse_than_global(w, cal):  # noqa: F811
    glob, lay = (read_meta(cal[s])["calibration"] for s in ("global", "layer"))
    assert lay["scope"] == "layer" and lay["scale"] == glob["scale"]
    assert lay["loss"] <= glob["loss"]
    n_layers = json.loads((w.base / "config.json").read_text())["num_hidden_layers"]
    assert sorted(map(int, lay["layer_scales"])) == list(range(n_layers))
    assert written_loss(w.base, cal["layer"], w.data) == pytest.approx(lay["loss"], rel=1e-6, abs=1e-7)
    got, plain = load_file(cal["layer"] / ADAPTER_WEIGHTS), load_file(w.recovered / ADAPTER_WEIGHTS)
    from loram.calibrate import layer_of

    for k, v in plain.items():
        s = lay["layer_scales"][str(layer_of(k))] if is_lora_b(k) else 1
        assert torch.equal(got[k], scaled(v, s)), k


def test_without_calibrate_the_output_is_unchanged(w, tmp_path, capsys):  # noqa: F811
    """No --calibrate: the plain recovery (library and CLI), no calibration record. The JSON files are byte for
    byte the same; the safetensors file has the same tensor bytes and metadata (safetensors writes its
    __metadata__ map in hash order, which differs between runs of the same code)."""
    from safetensors import safe_open

    from loram.cli import main

    assert main(["recover", str(w.adapter), "--base", str(w.base), "-o", str(tmp_path / "cli")]) == 0
    assert "calibrated" not in capsys.readouterr().out
    for name in (ADAPTER_CONFIG, ADAPTER_META):
        assert (tmp_path / "cli" / name).read_bytes() == (w.recovered / name).read_bytes(), name
    a, b = (safe_open(str(d / ADAPTER_WEIGHTS), "pt") for d in (tmp_path / "cli", w.recovered))
    assert a.metadata() == b.metadata() and list(a.keys()) == list(b.keys())
    assert all(a.get_tensor(k).dtype == b.get_tensor(k).dtype and torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert (tmp_path / "cli" / ADAPTER_WEIGHTS).stat().st_size == (w.recovered / ADAPTER_WEIGHTS).stat().st_size
    assert "calibration" not in read_meta(w.recovered)


def test_cli_prints_the_calibration_summary(w, tmp_path, capsys):  # noqa: F811
    from loram.cli import main

    rc = main(["recover", str(w.adapter), "--base", str(w.base), "-o", str(tmp_path / "c"), "--calibrate", str(w.data),
               "--calibrate-rows", "4", "--seq-len", "32"])
    out = capsys.readouterr().out
    rec = read_meta(tmp_path / "c")["calibration"]
    assert rc == 0 and f"loss {rec['loss_at_1']:.4f} at s=1, {rec['loss']:.4f} with s*={rec['scale']:g}" in out, out


# ---- bad input: one line, exit 2, nothing written, before the model loads ---------------------------------
def test_calibrate_missing_data_file(capsys, w):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.root / "nope.jsonl",
          expect="does not exist", out=w.root / "o")


def test_calibrate_scope_without_calibrate(capsys, w):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate-scope", "layer",
          expect="--calibrate-scope only applies with --calibrate DATA", out=w.root / "o")


def test_calibrate_too_few_rows(capsys, w):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data,
          expect="has 16 usable rows but --calibrate-rows asks for 32", out=w.root / "o")


def test_calibrate_zero_rows(capsys, w):  # noqa: F811
    fails(capsys, "recover", w.adapter, "--base", w.base, "-o", w.root / "o", "--calibrate", w.data, "--calibrate-rows", "0",
          expect="--calibrate-rows", out=w.root / "o")


def test_calibrate_streams_a_model_over_the_memory_budget(w, cal, tmp_path, capsys):  # noqa: F811
    """Over the budget, the candidates are scored by the streamed evaluation: the same losses, the same choice."""
    out = recover(w.adapter, w.base, tmp_path / "s", calibrate=str(w.data), calibrate_rows=ROWS, seq_len=SEQ, max_memory=0.00001)
    assert "streaming layer by layer" in capsys.readouterr().err
    got, ref = read_meta(out)["calibration"], read_meta(cal["global"])["calibration"]
    assert got["streamed"] and not ref["streamed"]
    assert got["scale"] == ref["scale"]
    for s, v in ref["losses"].items():
        assert got["losses"][s] == pytest.approx(v, rel=1e-5), s
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the scratch folder is gone
    a, b = load_file(out / ADAPTER_WEIGHTS), load_file(cal["global"] / ADAPTER_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_calibrate_hub_model_over_the_memory_budget(capsys, w, offline_hub):  # noqa: F811
    offline_hub("org/tiny", w.base)
    fails(capsys, "recover", w.adapter, "--base", "org/tiny", "-o", w.root / "o", "--calibrate", w.data, "--max-memory", "0.00001",
          expect="is not a local safetensors folder, which could be read layer by layer", out=w.root / "o")


def test_calibrate_library_scope_unknown(w, tmp_path):  # noqa: F811
    from loram.errors import LoramError

    with pytest.raises(LoramError, match="--calibrate-scope 'lol' is unknown"):
        recover(w.adapter, w.base, tmp_path / "o", calibrate=str(w.data), calibrate_scope="lol")
    assert not (tmp_path / "o").exists()
