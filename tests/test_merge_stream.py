"""`loram merge` streams: tensor by tensor from the base, into shards of the base's dtype and layout.

The reference is stock PEFT: PeftModel.from_pretrained(base) + merge_and_unload, in fp32. The streamed
merge does PEFT's operations in PEFT's order (B @ A, * scaling, W0 + delta, all fp32), so in fp32 the
results are the same bits; a bf16 checkpoint is the fp32 result rounded once to bf16.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_errors import fails

from loram.merge import merge
from loram.testing import random_checkpoint, random_lora, save_tiny, tiny_tokenizer
from loram.weights import INDEX_FILE

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A plain PEFT adapter on ``base`` with random non-zero A and B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    kw = dict(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False) | lora
    get_peft_model(model, LoraConfig(**kw)).save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Stock PEFT's merge: the whole model in memory, merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def written(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def dtypes(folder: Path) -> set[str]:
    found = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            found |= {h.get_slice(k).get_dtype() for k in h.keys()}
    return found


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def assert_same(ours: dict, ref: dict, tied: bool = False) -> None:
    want = {k for k in ref if not (tied and k == "lm_head.weight")}
    assert set(ours) == want, set(ours) ^ want
    for k in want:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("untied") / "base", "llama-bias")


# ---- equality with PEFT -----------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [
    {},
    {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    {"target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"]},
], ids=["plain", "rslora-patterns", "embeddings-and-head"])
def test_fp32_merge_is_peft_merge_bit_for_bit(tmp_path, untied, lora):
    ad = make_adapter(untied, tmp_path / "A", **lora)
    merge(untied, ad, tmp_path / "M")
    assert_same(written(tmp_path / "M"), peft_merged(untied, ad))
    assert dtypes(tmp_path / "M") == {"F32"}
    assert json.loads((tmp_path / "M" / "config.json").read_text())["dtype"] == "float32"


def test_bf16_checkpoint_stays_bf16_within_one_rounding(tmp_path, untied):
    """A bf16 base gives bf16 shards (half the bytes of the fp32 merge): the fp32 result rounded once."""
    from transformers import AutoModelForCausalLM

    base16 = tmp_path / "b16"
    AutoModelForCausalLM.from_pretrained(untied, dtype=torch.bfloat16).save_pretrained(base16)
    tiny_tokenizer().save_pretrained(base16)
    ad = make_adapter(untied, tmp_path / "A")
    merge(base16, ad, tmp_path / "M16")
    merge(untied, ad, tmp_path / "M32")
    ours = written(tmp_path / "M16")
    assert dtypes(tmp_path / "M16") == {"BF16"}
    assert json.loads((tmp_path / "M16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert 0.45 < size(tmp_path / "M16") / size(tmp_path / "M32") < 0.55
    # exactly PEFT's fp32 merge of the bf16 values, rounded once to bf16
    assert_same(ours, {k: v.to(torch.bfloat16) for k, v in peft_merged(base16, ad, torch.float32).items()})
    # and within one bf16 step of PEFT merging in bf16 (which rounds the update, then the sum)
    native = peft_merged(base16, ad, torch.bfloat16)
    for k, v in ours.items():
        ref = native[k].float()
        ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))))
        assert ((v.float() - ref).abs() <= ulp).all(), k


def test_sharded_base_keeps_its_shards_and_index(tmp_path, untied):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(untied, dtype=torch.float32).save_pretrained(base, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(base)
    shards = sorted(f.name for f in base.glob("*.safetensors"))
    assert len(shards) > 2
    ad = make_adapter(untied, tmp_path / "A")
    merge(base, ad, tmp_path / "M")
    assert sorted(f.name for f in (tmp_path / "M").glob("*.safetensors")) == shards
    want = json.loads((base / INDEX_FILE).read_text())["weight_map"]
    assert json.loads((tmp_path / "M" / INDEX_FILE).read_text())["weight_map"] == want
    assert_same(written(tmp_path / "M"), peft_merged(base, ad))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "M", dtype=torch.float32).state_dict()
    assert_same(loaded, peft_merged(base, ad))


def test_library_source_of_a_loaded_model_merges_like_the_folder(tmp_path, untied, monkeypatch):
    """A .gguf or hub id is merged from its loaded state dict (Weights.from_state_dict): the same code path.
    Here the folder is made to take that path (merge is told it is a .gguf; load_model still reads the
    folder) to compare the two."""
    import loram.merge

    ad = make_adapter(untied, tmp_path / "A")
    merge(untied, ad, tmp_path / "M")
    monkeypatch.setattr(loram.merge, "resolve_model", lambda name: (str(name), "model.gguf"))
    merge(untied, ad, tmp_path / "L")
    assert [f.name for f in (tmp_path / "L").glob("*.safetensors")] == ["model.safetensors"]
    assert_same(written(tmp_path / "L"), written(tmp_path / "M"))


# ---- tied embeddings ------------------------------------------------------------------------------
def test_tied_model_writes_no_lm_head(tmp_path, tiny_dir):
    ad = make_adapter(tiny_dir, tmp_path / "A", target_modules=["q_proj", "down_proj"])
    merge(tiny_dir, ad, tmp_path / "M")
    ours = written(tmp_path / "M")
    assert "lm_head.weight" not in ours
    assert json.loads((tmp_path / "M" / "config.json").read_text())["tie_word_embeddings"] is True
    assert_same(ours, peft_merged(tiny_dir, ad), tied=True)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens"]])
def test_tied_model_with_head_or_embedding_update_is_untied_and_equals_the_unmerged_adapter(tmp_path, tiny_dir, targets):
    """Folding an lm_head (or embedding) update into the one shared tensor would change both ends; loram
    writes them apart instead, so the merged model computes what the adapter on the base computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ad = make_adapter(tiny_dir, tmp_path / "A", target_modules=targets)
    merge(tiny_dir, ad, tmp_path / "M")
    ours, base = written(tmp_path / "M"), load_file(tiny_dir / "model.safetensors")
    assert json.loads((tmp_path / "M" / "config.json").read_text())["tie_word_embeddings"] is False
    e0, emb, head = base["model.embed_tokens.weight"], ours["model.embed_tokens.weight"], ours["lm_head.weight"]
    assert torch.equal(emb, e0) != ("embed_tokens" in targets)  # each end changes iff its own module is targeted
    assert torch.equal(head, e0) != ("lm_head" in targets)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "M", dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), ad)
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-5)


# ---- pruned bases -------------------------------------------------------------------------------
def test_pruned_base_merge_is_peft_merge_and_stays_bound_to_its_plan(tmp_path, tiny_dir):
    from peft import PeftModel

    from loram.loading import load_pruned, load_pruned_model
    from loram.prune import prune
    from loram.prune_plan import PrunePlan
    from loram.pruned_model import check_plan_binding
    from loram.weights import safetensors_files

    p = Path(prune(str(tiny_dir), tmp_path / "P", method="random", ratio=0.5).out)
    model, plan = load_pruned_model(p)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False)).save_pretrained(tmp_path / "A")
    merge(p, tmp_path / "A", tmp_path / "M")
    ref = PeftModel.from_pretrained(load_pruned(p), tmp_path / "A").merge_and_unload().state_dict()
    assert_same(written(tmp_path / "M"), ref, tied=True)
    assert PrunePlan.load(tmp_path / "M").id == plan.id
    check_plan_binding(safetensors_files(tmp_path / "M"), plan, str(tmp_path / "M"), "-")  # raises if unbound
    load_pruned(tmp_path / "M")


def test_keep_sparse_is_the_masked_peft_merge(tmp_path, tiny_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    from loram.loading import load_pruned
    from loram.prune import prune

    prune(str(tiny_dir), tmp_path / "P", method="magnitude", sparsity="unstructured", ratio=0.5, layers="1:5")
    torch.manual_seed(0)
    get_peft_model(load_pruned(tmp_path / "P"), LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False)
                   ).save_pretrained(tmp_path / "A")
    merge(tmp_path / "P", tmp_path / "A", tmp_path / "MS", keep_sparse=True)
    wp = load_file(next((tmp_path / "P").glob("*.safetensors")))
    ref = PeftModel.from_pretrained(load_pruned(tmp_path / "P"), tmp_path / "A").merge_and_unload().state_dict()
    ours = written(tmp_path / "MS")
    for k in ours:
        masked = k.startswith(tuple(f"model.layers.{i}." for i in range(1, 5))) and k.endswith("_proj.weight")
        want = ref[k] * (wp[k] != 0) if masked else ref[k]
        assert torch.equal(ours[k], want), k
        if masked:
            assert torch.equal(ours[k] == 0, wp[k] == 0)


# ---- refusals -------------------------------------------------------------------------------------
def test_dora_adapter_is_refused_in_one_line(capsys, tmp_path, untied):
    ad = make_adapter(untied, tmp_path / "A", use_dora=True, target_modules=["q_proj"])
    fails(capsys, "merge", untied, ad, "-o", tmp_path / "M", out=tmp_path / "M",
          expect="uses DoRA (use_dora), which loram merge does not fold into the weights")


# ---- memory ----------------------------------------------------------------------------------------
MEDIUM = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, vocab_size=16384)
PEAK = textwrap.dedent("""
    import json, sys, threading, time
    from loram.merge import merge
    from loram.procmem import PeakRSS

    def anon():  # resident anonymous memory: what the merge allocates, without file-backed pages
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024 / 1e9

    merge(sys.argv[1], sys.argv[2], sys.argv[3])  # warm-up: imports, first-call caches
    top, done = [anon()], threading.Event()

    def watch():
        while not done.is_set():
            top.append(anon())
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    peak = PeakRSS()
    t.start()
    merge(sys.argv[4], sys.argv[5], sys.argv[6])
    done.set()
    t.join()
    print(json.dumps({"anon_above_gb": max(top) - top[0], "rss_above_gb": peak.above_baseline_gb()}))
""")


def test_merge_peak_is_a_fraction_of_the_fp32_model(tmp_path, untied):
    """Streaming: the merge's peak above the process baseline is far below the model's fp32 size (the old
    merge held the fp32 model, PEFT's copy and the save: ~3.3x). Measured as resident anonymous memory,
    sampled every ms: the RSS high-water mark also counts library code pages the kernel evicted under
    other processes' memory pressure and the merge faulted back in (seen once: +0.10 GB)."""
    base = random_checkpoint(tmp_path / "base", one_row=True, **MEDIUM)
    fp32_gb = 2 * size(base) / 1e9
    ad = random_lora(tmp_path / "A", base, ("q_proj", "v_proj", "down_proj"), rank=8)
    warm = make_adapter(untied, tmp_path / "wA")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", PEAK, str(untied), str(warm), str(tmp_path / "w"), str(base), str(ad),
                        str(tmp_path / "M")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["anon_above_gb"] < fp32_gb / 4, (got, fp32_gb)
    assert dtypes(tmp_path / "M") == {"BF16"} and size(tmp_path / "M") == pytest.approx(size(base), rel=0.01)


def test_merge_runs_under_a_cap_below_the_fp32_model(tmp_path, memcap_tool):
    """`loram merge` of a bf16 checkpoint under a hard memory cap smaller than the model in fp32
    (skipped without the workplace's memcap tool: conftest.memcap_tool)."""
    tool = memcap_tool
    base = random_checkpoint(tmp_path / "base", one_row=True, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                             num_attention_heads=8, vocab_size=32000)
    fp32_gib = 2 * size(base) / 2**30  # 0.63 GiB (the process alone, torch + transformers + peft imported, is ~0.35)
    cap = 0.55
    assert cap < fp32_gib
    ad = random_lora(tmp_path / "A", base, ("q_proj", "v_proj", "down_proj"), rank=8)
    env = dict(os.environ, MEMCAP_TIMEOUT="120", MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([str(tool), str(cap), sys.executable, "-m", "loram", "merge", str(base), str(ad), "-o", str(tmp_path / "M")],
                       capture_output=True, text=True, env=env, timeout=200)
    assert r.returncode == 0, (fp32_gib, r.stderr[-2000:])
    assert "merged model written to" in r.stdout
    assert size(tmp_path / "M") == pytest.approx(size(base), rel=0.01)


def test_pruned_tied_base_with_head_update_is_untied_and_still_loads_as_pruned(tmp_path, tiny_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    from loram.loading import load_pruned
    from loram.prune import prune

    p = Path(prune(str(tiny_dir), tmp_path / "P", method="random", ratio=0.5).out)
    torch.manual_seed(0)
    get_peft_model(load_pruned(p), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "A")
    merge(p, tmp_path / "A", tmp_path / "M")
    assert json.loads((tmp_path / "M" / "config.json").read_text())["tie_word_embeddings"] is False
    merged, unmerged = load_pruned(tmp_path / "M"), PeftModel.from_pretrained(load_pruned(p), tmp_path / "A")
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, unmerged(ids).logits, atol=1e-5)


def test_adapter_with_peft_embedding_copies_attaches_for_generate(tmp_path, untied):
    """PEFT saves copies of the embedding layers with an embed_tokens / lm_head adapter (save_embedding_layers):
    attach (generate, eval) accepts them as merge does, instead of refusing them as unexpected keys."""
    from loram.merge import load_with_adapter

    ad = make_adapter(untied, tmp_path / "A", target_modules=["q_proj", "embed_tokens", "lm_head"])
    assert any(k.endswith("base_layer.weight") for k in load_file(ad / "adapter_model.safetensors"))
    pm, _ = load_with_adapter(untied, ad)
    assert_same(pm.merge_and_unload().state_dict(), peft_merged(untied, ad))
