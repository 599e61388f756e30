"""The Hugging Face Hub: reading a repo's files (``download``) and `--push-to-hub REPO_ID` (``push``).

Reading: ``download`` is the one place loram calls huggingface_hub.snapshot_download (a hub id to
stream, a pruned base loram pushed): the files come from the local cache when they are there, and
with HF_HUB_OFFLINE=1 from the cache alone; a repo that cannot be had is one line naming it.

Pushing: checked before any work (a valid repo id, not offline, huggingface_hub present), pushed after the
folder is complete: a push that fails leaves the folder written and says how to push it later.
The folder goes as written, model card (README.md, card.py) included.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import LoramError

PUSH_VERBS = ("prune", "align", "train", "recover", "merge")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_OFF = ("1", "ON", "YES", "TRUE")
# what reading a model from the Hub needs: weights, config (+ loram_plan.json of a pruned base), tokenizer,
# generation defaults; never pickles (*.bin), which loram does not load
MODEL_FILES = ["*.safetensors", "*.json", "tokenizer.model", "merges.txt", "*.jinja"]


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set: the Hub is switched off, only the local cache is read."""
    return any(os.environ.get(v, "").upper() in _OFF for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_repo_id(name) -> bool:
    """``name`` reads as OWNER/NAME and is no local path: what loram resolves on the Hub."""
    s = str(name)
    return bool(_REPO.match(s)) and ".." not in s and not s.endswith((".git", ".", ".gguf")) and not Path(s).exists()


def download(repo_id: str, patterns: list[str] = MODEL_FILES) -> Path:
    """The local snapshot folder of hub repo ``repo_id`` holding its files that match ``patterns``
    (those the repo has: a pattern that matches nothing is no error). One line naming the repo and
    the fix when it cannot be had (offline and not cached, no network, unknown or gated repo)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LoramError(f"{repo_id} is a hub id and reading it needs huggingface_hub: pip install huggingface_hub, "
                         "or pass a local folder") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo, network: one line each way
        raise LoramError(_download_error(repo_id, e)) from None


def _download_error(repo_id: str, e: Exception) -> str:
    if offline():
        return (f"hub repo {repo_id} is not in the local Hugging Face cache and the Hub is switched off here (HF_HUB_OFFLINE / "
                f"TRANSFORMERS_OFFLINE is set): unset it to download {repo_id}, download it once where the Hub can be "
                f"reached (`hf download {repo_id}`), or pass a local folder")
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"cannot download hub repo {repo_id} ({msg}): check the id, the network and your login (`hf auth login`), "
            "or pass a local folder")


def check_push(repo_id: str) -> None:
    """One line (before anything is loaded) when ``repo_id`` cannot be pushed to from here."""
    if not _REPO.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise LoramError(f"--push-to-hub {repo_id!r} is not a hub repo id: use OWNER/NAME, e.g. me/smollm2-loram")
    if offline():
        raise LoramError(f"--push-to-hub {repo_id}: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE "
                         "is set): unset it, or drop --push-to-hub and upload the folder later with `hf upload`")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise LoramError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None


def push(folder: str | Path, repo_id: str, what: str) -> str:
    """Create ``repo_id`` (private unless it exists) and upload ``folder``; returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"loram {what}",
                          ignore_patterns=[".*", "**/.*"])  # lock files and temporaries start with a dot
    except Exception as e:  # network, auth, quota: the folder is complete either way
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoramError(f"could not push {folder} to {repo_id} ({msg}): the folder is written; log in with `hf auth login` "
                         f"and upload it with `hf upload {repo_id} {folder}`") from None
    return str(url)
