"""loram plan: exact parameter counts, the paper's storage numbers, the activation count, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from loram.families import geometry
from loram.planner import PruneSpec, TrainSettings, count, layer_widths, predict, preset_config, preset_names, smallest_ratio, storage
from loram.planner.memory import layer_saved_bytes
from loram.planner.params import LayerWidths, nf4_constant_bytes
from loram.prune.structured import select
from loram.prune_plan import PrunePlan, parse_layers
from loram.pruned_model import count_params, skeleton
from loram.testing import TINY, save_tiny, tiny_config


def random_plan(config, ratio, attn, layers, seed=0) -> PrunePlan:
    g = geometry(config)
    start, end = parse_layers(layers, g.n_layers)
    return PrunePlan(kind="structured", method="random", layers=(start, end), mlp_ratio=ratio, attn_ratio=attn,
                     base={"name": "x", "config": config.to_dict()},
                     pruned=select(g, "random", range(start, end), ratio, attn, seed))


def random_settings(rng: random.Random, n_layers: int):
    ratio = round(rng.uniform(0.05, 0.9), 3)
    attn = rng.choice([0.0, ratio, round(rng.uniform(0.0, 0.9), 3)])
    start = rng.randrange(0, n_layers)
    end = rng.randrange(start + 1, n_layers + 1)
    return ratio, attn, f"{start}:{end}"


# ---- exact parameters ------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY))
def test_closed_form_equals_meta_build(family):
    rng = random.Random(family)
    config = tiny_config(family)
    assert count(config, layer_widths(config, None)).total == count_params(skeleton(config, None))
    for _ in range(6):
        ratio, attn, layers = random_settings(rng, config.num_hidden_layers)
        spec = PruneSpec("random", ratio, attn, layers)
        plan = random_plan(config, ratio, attn, layers, seed=rng.randrange(100))
        meta = count_params(skeleton(config, plan))
        assert predict(config, spec).params_pruned == meta, (ratio, attn, layers)
        assert predict(config, plan).params_pruned == meta  # the plan's own kept lists agree


@pytest.mark.parametrize("family", sorted(TINY))
def test_equals_the_model_loram_prune_writes(family, tmp_path):
    from loram.io import load_config
    from loram.loading import load_pruned
    from loram.prune import prune

    base = save_tiny(tmp_path / "base", family)
    config = load_config(base)
    ratio, attn, layers = random_settings(random.Random(f"prune-{family}"), config.num_hidden_layers)
    rep = prune(str(base), tmp_path / "P", method="random", ratio=ratio, attn_ratio=attn, layers=layers, seed=3)
    pred = predict(config, PruneSpec("random", ratio, attn, layers))
    assert pred.params_original == rep.params_original
    assert pred.params_pruned == rep.params_pruned == count_params(load_pruned(tmp_path / "P"))


def test_smollm2_preset_counts():
    config = preset_config("SmolLM2-135M")
    assert count(config, layer_widths(config, None)).total == 134_515_008  # /work/shared/NOTES.md: 134.5 M, tied
    rng = random.Random(0)
    for _ in range(3):
        ratio, attn, layers = random_settings(rng, 30)
        plan = random_plan(config, ratio, attn, layers)
        assert predict(config, PruneSpec("taylor", ratio, attn, layers)).params_pruned == count_params(skeleton(config, plan))


def test_presets_build_and_match_meta():
    for name in preset_names():
        config = preset_config(name)
        assert predict(config).params_original == count_params(skeleton(config, None)), name


def test_paper_storage_reduction():
    """QLoRAM-Stru 0.85 on layers 4-77, NF4 counted as 4 bits (paper Table: 15.81x and 16.95x)."""
    for name, want, n_orig, n_pruned in (("Llama-3.1-70B", 15.81, 70_553_706_496, 17_849_982_976),
                                         ("Llama-2-70B", 16.95, 68_976_648_192, 16_272_924_672)):
        p = predict(preset_config(name), PruneSpec("structured", 0.85, layers="4:78"))
        assert (p.params_original, p.params_pruned) == (n_orig, n_pruned)
        assert round(p.storage_reduction_nf4, 2) == want
        assert p.storage_reduction_nf4_actual < p.storage_reduction_nf4  # constants and 16-bit embeddings cost


def test_sparse_keeps_shapes_and_counts_nonzeros():
    config = tiny_config("llama-gqa")
    p = predict(config, PruneSpec("wanda", 0.5, layers="0:6"))
    assert p.params_pruned == p.params_original
    c = count(config, layer_widths(config, None))
    assert p.pruned.nonzeros == c.total - c.linear_weights // 2  # every in-width is even here
    nm = predict(config, PruneSpec("sparsegpt", 0.5, layers="0:6", sparsity="2:4"))
    assert nm.pruned.nonzeros == p.pruned.nonzeros


def test_nf4_constants_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    for out, inp in ((48, 80), (24, 48), (1000, 333)):
        w = bnb.nn.Params4bit(torch.randn(out, inp), requires_grad=False, compress_statistics=True, quant_type="nf4")
        lin = bnb.nn.Linear4bit(inp, out, bias=False, compress_statistics=True, quant_type="nf4")
        lin.weight = w
        lin = lin.to("cpu")
        qs = lin.weight.quant_state
        tensors = (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code)
        assert nf4_constant_bytes(out * inp) == sum(t.numel() * t.element_size() for t in tensors)
        assert lin.weight.numel() == (out * inp + 1) // 2
    c = count(tiny_config(), layer_widths(tiny_config(), None))
    assert storage(c).nf4_weights == sum((o * i + 1) // 2 for o, i in c.linear_shapes)


# ---- activations: the closed form equals what autograd saves --------------------------------
def _saved_bytes_per_token(settings: TrainSettings, layer: int = 2):
    """(bytes autograd saves per token in one middle layer, the model's Geometry)."""
    from peft import get_peft_model

    from loram.train import TrainConfig, lora_config

    config = tiny_config("llama-gqa", num_hidden_layers=4, hidden_size=64, intermediate_size=160, head_dim=16,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    bf16 = settings.precision == "bf16"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    pm = get_peft_model(model, lora_config(TrainConfig(data=[], rank=settings.rank, dropout=settings.dropout))).train()
    params = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    cur = [None]
    block = pm.base_model.model.model.layers[layer]
    block.register_forward_pre_hook(lambda *a: cur.__setitem__(0, True))
    block.register_forward_hook(lambda *a: cur.__setitem__(0, None))
    totals = []
    for n in (64, 128):
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if cur[0] and ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(3, config.vocab_size, (1, n))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pm(input_ids=ids, labels=ids)
        totals.append(sum(seen.values()))
    a = settings.act_bytes
    # slope over tokens removes the per-step constants (bf16 copies of the LoRA matrices); the rotary
    # cos/sin this layer reuses are counted once per model by the planner, not per layer
    return (totals[1] - totals[0]) / 64 - 2 * a * config.head_dim, geometry(config)


@pytest.mark.parametrize("precision,dropout", [("bf16", 0.05), ("bf16", 0.0), ("fp32", 0.05), ("fp32", 0.0)])
def test_layer_activation_count(precision, dropout):
    s = TrainSettings(precision=precision, dropout=dropout)
    measured, g = _saved_bytes_per_token(s)
    assert measured == layer_saved_bytes(g, LayerWidths(g.intermediate, g.n_kv_heads), s)


# ---- memory model sanity, search, CLI ---------------------------------------------------------
def test_memory_orders_and_search():
    config = preset_config("Llama-2-7B")
    s = TrainSettings(grad_checkpointing=True)
    p = predict(config, PruneSpec("structured", 0.65), s)
    m = {k: v.gb for k, v in p.schemes.items()}
    assert m["QLoRAM"] < m["LoRAM"] < m["LoRA"] and m["QLoRAM"] < m["QLoRA"] < m["LoRA"]
    nogc = predict(config, PruneSpec("structured", 0.65), TrainSettings(grad_checkpointing=False))
    assert nogc.schemes["LoRA"].gb > m["LoRA"]
    r = smallest_ratio(config, PruneSpec("structured"), s, 6.0, quantized=False)
    assert r is not None
    assert predict(config, PruneSpec("structured", r), s).schemes["LoRAM"].gb <= 6.0
    assert predict(config, PruneSpec("structured", round(r - 0.01, 2)), s).schemes["LoRAM"].gb > 6.0
    assert smallest_ratio(config, PruneSpec("structured"), s, 0.5, quantized=True) is None
    assert smallest_ratio(config, PruneSpec("structured"), s, 8.0, quantized=True) == 0.0  # QLoRA fits unpruned


def run_cli(argv, capsys):
    from loram.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_fields(capsys):
    rc, out, _ = run_cli(["plan", "Llama-3.1-70B", "--ratio", "0.85", "--layers", "4:78", "--grad-checkpointing",
                          "--gpu-gb", "20", "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["params_original"] == 70_553_706_496 and d["params_pruned"] == 17_849_982_976
    assert round(d["storage_reduction_nf4"], 2) == 15.81 and d["param_reduction"] > 3.9
    for scheme in ("LoRA", "QLoRA", "LoRAM", "QLoRAM"):
        s = d["schemes"][scheme]
        assert s["memory_gb"] > 0 and {"weights", "activations_held", "logits_loss", "overhead"} <= set(s["terms_gb"])
    assert d["schemes"]["LoRA"]["fits"] is False


def test_cli_search_table_and_inputs(capsys, tmp_path, tiny_dir):
    rc, out, _ = run_cli(["plan", "llama-2-7b", "--gpu-gb", "8", "--json", "--grad-checkpointing"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["searched_ratio"] is not None and d["schemes"]["LoRAM"]["fits"]
    rc, out, _ = run_cli(["plan", "SmolLM2-135M", "--ratio", "0.5"], capsys)
    assert rc == 0 and "QLoRAM" in out and "134,515,008" in out
    # a config.json and a pruned folder (its plan's exact kept lists)
    rc, out, _ = run_cli(["plan", str(tiny_dir / "config.json"), "--ratio", "0.5", "--json"], capsys)
    assert rc == 0 and json.loads(out)["params_original"] == count_params(skeleton(tiny_config(), None))
    from loram.prune import prune

    rep = prune(str(tiny_dir), tmp_path / "P", method="random", ratio=0.4)
    rc, out, _ = run_cli(["plan", str(tmp_path / "P"), "--json"], capsys)
    assert rc == 0 and json.loads(out)["params_pruned"] == rep.params_pruned


def test_cli_errors(capsys):
    rc, _, err = run_cli(["plan", "NoSuchModel-7B"], capsys)
    assert rc == 2 and "preset" in err and "\n" == err[-1] and err.count("\n") == 1
    rc, _, err = run_cli(["plan", "SmolLM2-135M", "--ratio", "1.5"], capsys)
    assert rc == 2 and "--ratio" in err
    rc, _, err = run_cli(["plan", "SmolLM2-135M", "--method", "bogus"], capsys)
    assert rc == 2 and "--method" in err


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": -4096}, "hidden_size -4096 is out of range: use an integer >= 1 and <= 262144"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers 1000000000 is out of range: use an integer >= 1 and <= 4096"),
    ({"num_hidden_layers": 0}, "num_hidden_layers 0 is out of range"),
    ({"intermediate_size": 11008.5}, "intermediate_size 11008.5 is not an integer"),
    ({"vocab_size": "32000"}, "vocab_size '32000' is not an integer"),
    ({"num_attention_heads": 30}, "hidden_size 4096 is not a multiple of num_attention_heads 30: fix the config"),
    ({"num_key_value_heads": 3}, "num_attention_heads 32 is not a multiple of num_key_value_heads 3: fix the config"),
    ({"num_hidden_layers": None}, "num_hidden_layers None is not an integer"),
])
def test_cli_refuses_nonsense_config_sizes(capsys, tmp_path, change, message):
    """A config.json with impossible sizes fails in one line before the planner (or transformers) uses them."""
    import time

    from loram.planner.presets import PRESET_DIR

    d = json.loads((PRESET_DIR / "Llama-2-7B.json").read_text())
    d.update(change)
    f = tmp_path / "config.json"
    f.write_text(json.dumps(d))
    t = time.perf_counter()
    rc, out, err = run_cli(["plan", str(f)], capsys)
    assert time.perf_counter() - t < 5
    assert rc == 2 and out == "" and err.startswith(f"error: {f}: {message}") and err.count("\n") == 1, err
