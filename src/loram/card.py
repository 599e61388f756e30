"""Model cards: the README.md (Hub front matter + a summary) of every folder loram writes.

Written by ``io.atomic_dir`` from what the folder already holds, just before it is published, so
no command passes extra state and a card can never disagree with its folder:

    config.json         architecture (model_type, layers, hidden size)
    loram_plan.json     what was pruned (kind, method, ratios, layers, parameter counts, the base)
    adapter_config.json a PEFT adapter: library_name peft, rank, alpha, targets
    loram_adapter.json  pruned / recovered stage, the base it belongs to, the training settings
    train_report.json   steps, tokens, final loss, held-out perplexities (measured)
    loram_output.json   which loram command wrote the folder

The YAML front matter is what the Hugging Face Hub renders (base_model, library_name, tags,
pipeline_tag, datasets). An existing README.md that loram did not write is never replaced (a
folder's own card passed through, e.g. a hub model copied by `loram merge`); PEFT's placeholder
template, written into loram's temporary folder by PEFT itself, is.
"""

from __future__ import annotations

import json
from pathlib import Path

CARD = "README.md"
CARD_MARK = "<!-- written by loram -->"
PEFT_TEMPLATE = "<!-- Provide a quick summary of what the model is/does. -->"  # PEFT's model card placeholder
PAPER = "https://arxiv.org/abs/2502.13533"


def _read(folder: Path, name: str) -> dict:
    try:
        return json.loads((folder / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _hub_id(name) -> str | None:
    """``name`` when it looks like a hub id (owner/model), else None: local paths are not base_model."""
    s = str(name or "")
    return s if s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists() else None


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values] if values else []


def card_text(folder: str | Path, command: str) -> str:
    """The README.md for ``folder`` (see the module docstring for what it reads)."""
    folder = Path(folder)
    cfg, plan, lora = _read(folder, "config.json"), _read(folder, "loram_plan.json"), _read(folder, "adapter_config.json")
    meta, report = _read(folder, "loram_adapter.json"), _read(folder, "train_report.json")
    adapter = bool(lora)
    base = (meta.get("base_name") if meta.get("stage") == "recovered" else None) or plan.get("base", {}).get("name") \
        or lora.get("base_model_name_or_path") or cfg.get("_name_or_path")
    train = meta.get("train") or {}
    datasets = [d for d in (train.get("data") or []) if _hub_id(d)]
    tags = ["loram", "lora" if adapter else "pruned" if plan else "merged"] + ([f"loram-{plan['kind']}"] if plan.get("kind") else [])
    front = ["---", *([f"base_model: {json.dumps(_hub_id(base))}"] if _hub_id(base) else []),
             f"library_name: {'peft' if adapter else 'transformers'}", "pipeline_tag: text-generation",
             *_yaml_list("tags", tags), *_yaml_list("datasets", datasets), "---"]
    what = {"prune": "a pruned base model", "build": "a pruned base model", "import-plan": "a pruned base model",
            "align": "an aligned pruned base model", "train": "a LoRA adapter", "recover": "a recovered LoRA adapter",
            "merge": "a merged model"}.get(command, "a model folder")
    lines = [*front, CARD_MARK, "", f"# {folder.name if not folder.name.startswith('.') else 'loram output'}", "",
             f"This folder is {what} written by loram (`loram {command}`), an implementation of "
             f"LoRAM, *Train Small, Infer Large* ([paper]({PAPER})): LoRA trained on a pruned model, recovered to the "
             "original's shapes and used on the original.", ""]
    if base:
        lines += [f"- Original model: `{base}`"]
    if cfg:
        lines += [f"- Architecture: {cfg.get('model_type', '?')}, {cfg.get('num_hidden_layers', '?')} layers, hidden "
                  f"{cfg.get('hidden_size', '?')}, {cfg.get('num_attention_heads', '?')} heads / "
                  f"{cfg.get('num_key_value_heads', cfg.get('num_attention_heads', '?'))} KV heads"]
    if plan:
        extra = plan.get("extra") or {}
        counts = (f"; parameters {extra['params_original']:,} -> {extra['params_pruned']:,}"
                  if isinstance(extra.get("params_original"), int) and isinstance(extra.get("params_pruned"), int) else "")
        sparse = plan.get("sparse") or {}
        ratio = (f"{sparse.get('pattern')} sparsity {sparse.get('sparsity')}" if plan.get("kind") == "sparse" else
                 f"MLP ratio {plan.get('mlp_ratio')}"
                 + (f" ({plan['allocation']} allocation over the layers)" if plan.get("allocation") else "")
                 + f", attention ratio {plan.get('attn_ratio')}")
        lines += [f"- Prune plan: {plan.get('kind')} / {plan.get('method')}, layers {plan.get('layers')}, {ratio}{counts}"]
    if adapter:
        lines += [f"- LoRA: rank {lora.get('r')}, alpha {lora.get('lora_alpha')}, targets "
                  f"{', '.join(sorted(lora.get('target_modules') or []))}; stage: {meta.get('stage', 'plain')}"]
        if meta.get("stage") == "pruned":
            lines += ["- This adapter fits the *pruned* model only: `loram recover ADAPTER --base ORIGINAL -o OUT` makes "
                      "the adapter for the original."]
    if train:
        keys = ("data", "steps", "lr", "rank", "alpha", "seq_len", "micro_batch", "grad_accum", "quantize", "seed")
        lines += ["- Training: " + ", ".join(f"{k} {train[k]}" for k in keys if train.get(k) not in (None, [], ""))]
    if report:
        final = (report.get("losses") or [{}])[-1].get("loss")
        ppl = ", ".join(f"{k} {v:.3f}" for k, v in (report.get("eval_ppl") or {}).items())
        lines += [f"- Measured: {report.get('steps')} steps, {report.get('tokens'):,} tokens in {report.get('wall_s', 0):.0f} s"
                  + (f", final loss {final:.4f}" if isinstance(final, (int, float)) else "")
                  + (f", held-out perplexity {ppl}" if ppl else "")]
    lines += ["", "Files: see loram's docs/formats.md for the folder format.", ""]
    return "\n".join(lines)


def write_card(folder: str | Path, command: str) -> None:
    """Write ``folder``/README.md for a model, adapter or plan folder, unless it holds a card loram did not write."""
    folder = Path(folder)
    if not any((folder / f).exists() for f in ("config.json", "adapter_config.json", "loram_plan.json")):
        return  # not a model, adapter or plan folder (an eval or inspect output): nothing the Hub would render
    p = folder / CARD
    if p.exists():
        old = p.read_text(errors="replace")
        if CARD_MARK not in old and PEFT_TEMPLATE not in old:
            return
    p.write_text(card_text(folder, command))
