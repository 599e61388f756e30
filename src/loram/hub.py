"""`--push-to-hub REPO_ID`: upload a folder loram wrote to the Hugging Face Hub (huggingface_hub).

Checked before any work (a valid repo id, not offline, huggingface_hub present), pushed after the
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


def check_push(repo_id: str) -> None:
    """One line (before anything is loaded) when ``repo_id`` cannot be pushed to from here."""
    if not _REPO.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise LoramError(f"--push-to-hub {repo_id!r} is not a hub repo id: use OWNER/NAME, e.g. me/smollm2-loram")
    if any(os.environ.get(v, "").upper() in _OFF for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
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
