"""`loram merge` and `loram generate`: put a recovered adapter on the original model.

    W = W0 + (alpha / r) * B_full A_full     (PEFT's merge_and_unload)

Our loader checks the adapter's recorded base fingerprint against the base it is given, so an
adapter never lands on the wrong model, and never loads partially (see adapter.attach).

--keep-sparse (sparse plans only; BASE must be the sparse pruned folder, whose zeros are the mask):

    W = W_p + (alpha / r) (B A) * M,     M = (W_p != 0) on the targeted linears of the plan's layers

so the merged model keeps exactly the zeros of the pruned one (for sparse kernels). The default,
as in the paper, merges the full update into the dense original.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import STAGE_PRUNED, attach, check_adapter_dir, read_meta
from .errors import LoramError
from .fingerprint import check_verify, describe_difference, same_model
from .io import atomic_dir, check_output, load_tokenizer, releases_locks
from .loading import load_model, load_pruned_model
from .progress import enabled
from .prune.sparse import sparse_masks
from .prune_plan import PrunePlan, has_plan


def load_with_adapter(base: str | Path, adapter: str | Path | None = None, dtype=torch.float32, check_base: bool = True,
                      verify_base: str = "sampled"):
    """(model, tokenizer) for an original model or a pruned folder, with an adapter attached if given.

    verify_base="full": compare every byte of ``base`` with the digest the adapter's plan recorded."""

    pruned = check_adapter_request(base, adapter, check_base, verify_base)
    model, plan = load_pruned_model(base, dtype=dtype) if pruned else (load_model(base, dtype=dtype), None)
    tok = load_tokenizer(base)
    if adapter is None:
        return model, tok
    check_adapter_fits(base, adapter, plan, check_base, verify_base, model)
    return attach(model, adapter), tok


def check_adapter_request(base: str | Path, adapter: str | Path | None, check_base: bool = True, verify_base: str = "sampled") -> bool:
    """Checks before anything is loaded (every path that puts an adapter on a base calls them):
    the adapter folder is complete, --verify-base is possible. Returns whether ``base`` is a pruned folder."""
    check_verify(verify_base)
    if adapter is not None:
        check_adapter_dir(adapter)  # an incomplete or edited adapter fails before the model loads
    pruned = Path(str(base)).is_dir() and has_plan(base)
    if verify_base == "full" and (pruned or adapter is None or not check_base):
        raise LoramError("--verify-base full checks an original base against a recovered adapter: pass the original "
                         "model and the recovered adapter, or drop --verify-base full")
    return pruned


def check_adapter_fits(base: str | Path, adapter: str | Path, plan: PrunePlan | None, check_base: bool = True,
                       verify_base: str = "sampled", model=None) -> None:
    """The adapter's stage, base fingerprint and plan fit ``base`` (``plan``: the pruned folder's, None for an
    original). Needs no loaded model for a local folder; ``model`` only fingerprints a GGUF or hub base."""
    pruned = plan is not None
    meta = read_meta(adapter)
    if meta and meta.get("stage") == STAGE_PRUNED and not pruned:
        raise LoramError(f"{adapter} was trained on a pruned model and does not fit the original: run "
                         f"`loram recover {adapter} --base {base} -o RECOVERED` first (or pass the pruned model folder)")
    if meta and check_base and not pruned and meta.get("base_fingerprint"):
        from .fingerprint import base_fingerprint

        got = base_fingerprint(base, model)
        want = meta["base_fingerprint"]
        if not same_model(want, got):
            raise LoramError(f"adapter {adapter} was recovered for another base model ({describe_difference(want, got)}): "
                             f"pass the original it was made for ({meta.get('base_name')})")
        if verify_base == "full":
            from .fingerprint import check_base_full

            check_base_full(want, base, f"adapter {adapter}", "was recovered for")
    elif verify_base == "full":
        raise LoramError(f"adapter {adapter} records no base fingerprint to verify: drop --verify-base full")
    if meta and pruned and meta.get("plan_id") and meta.get("stage") == STAGE_PRUNED:
        if meta["plan_id"] != plan.id:
            raise LoramError(f"adapter {adapter} was trained on another prune plan ({meta['plan_id']}) than {base} "
                             f"({plan.id}): pass the pruned model it was trained on")


@releases_locks
def merge(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False, dtype=torch.float32,
          keep_sparse: bool = False, verify_base: str = "sampled", max_memory: float | None = None) -> Path:
    """Write a standard merged HF model folder: the original with the adapter folded into its weights."""
    check_output(out, overwrite, inputs=(base, adapter))
    plan = _sparse_plan(base) if keep_sparse else None
    pm, tok = load_with_adapter(base, adapter, dtype=dtype, verify_base=verify_base)
    if plan is not None:
        masks = sparse_masks(pm, plan)
    merged = pm.merge_and_unload(progressbar=enabled())  # PEFT's own tqdm bar, one step per module
    if plan is not None:
        with torch.no_grad():
            for name, m in masks.items():
                merged.get_parameter(name).mul_(m)
    with atomic_dir(out, overwrite, "merge", (base, adapter)) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if has_plan(base):  # a merged pruned model is still a pruned model folder, bound to the same plan
            import shutil

            from .prune_plan import PLAN_FILE, PrunePlan
            from .pruned_model import bind_plan
            from .weights import safetensors_files

            shutil.copy(Path(base) / PLAN_FILE, Path(tmp) / PLAN_FILE)
            bind_plan(safetensors_files(tmp), PrunePlan.load(tmp))
    return Path(out)


def _sparse_plan(base):

    plan = PrunePlan.load(base) if Path(str(base)).is_dir() and has_plan(base) else None
    if plan is None or plan.kind != "sparse":
        raise LoramError(f"--keep-sparse needs the sparse pruned model as BASE (its zeros are the mask), not {base}: "
                         "pass the folder written by `loram prune --sparsity ...`")
    return plan


def generate(model_name: str | Path, prompt: str, adapter: str | Path | None = None, max_new_tokens: int = 64,
             chat: bool = True, temperature: float = 0.0, verify_base: str = "sampled") -> str:
    model, tok = load_with_adapter(model_name, adapter, verify_base=verify_base)
    if chat and getattr(tok, "chat_template", None):
        from .data import chat_template_ids

        ids = torch.tensor([chat_template_ids(tok, [{"role": "user", "content": prompt}], gen_prompt=True)])
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        kw["temperature"] = temperature
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
