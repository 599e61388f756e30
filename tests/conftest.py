import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama-GQA model saved as an HF folder (safetensors + tokenizer), shared read-only."""
    from loram.testing import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "base", "llama-gqa")


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory):
    import json

    p = tmp_path_factory.mktemp("data") / "add.jsonl"
    rows = [{"instruction": f"add {a} {b}", "input": "", "output": str(a + b)} for a in range(8) for b in range(8)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """publish(repo_id, folder): ``folder`` becomes hub repo ``repo_id`` in a fresh hub cache (loram.testing.hub_cache)
    that this test's huggingface_hub and transformers read, offline (HF_HUB_OFFLINE=1, set above): no network.
    ``publish.env`` is the environment that points a ``python -m loram`` subprocess at the same cache."""
    import huggingface_hub.constants as constants

    from loram.testing import hub_cache

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def publish(repo_id, folder):
        return hub_cache(cache, repo_id, folder)

    publish.env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return publish


@pytest.fixture(scope="session")
def memcap_tool():
    """The workplace's hard-memory-cap tool (../shared/tools/memcap, or $LORAM_MEMCAP), checked once.

    Tests that use it are skipped on a fresh clone without ../shared and where no memory cgroup is
    writable (the tool exits 3): they prove "runs within N GB" where that can be proven."""
    import subprocess
    from pathlib import Path

    tool = Path(os.environ.get("LORAM_MEMCAP", Path(__file__).resolve().parents[2] / "shared" / "tools" / "memcap"))
    if not tool.exists():
        pytest.skip(f"{tool} not found (the memory-cap tool of this workplace; set LORAM_MEMCAP to use another copy)")
    if subprocess.run([str(tool), "1", "true"], capture_output=True, text=True).returncode == 3:
        pytest.skip("no writable memory cgroup here (memcap exit 3)")
    return tool
