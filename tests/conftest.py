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
