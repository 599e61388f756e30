"""The `loram` command line: one verb per paper stage, each a thin layer over one library function.

User errors (LoramError, bad arguments) print one line `error: ...` and exit 2; `--debug` shows
the traceback. Each verb lives in its own module here and registers itself in COMMANDS (a verb's dashes are
underscores in its module name: import-plan -> import_plan.py).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

# verb modules, in the order `loram --help` lists them
COMMANDS = ["prune", "import-plan", "build", "align", "train", "recover", "merge", "generate", "eval", "inspect", "demo", "run", "plan"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loram", description="Train small, infer large: LoRA on pruned LLMs, recovered to the original.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"loram.cli.{name.replace('-', '_')}").add(sub)  # verb import-plan -> import_plan.py
    from .common import name_numbers

    name_numbers(p)  # numeric flags name themselves in their error line
    for verb in sub.choices.values():  # one flag for every verb, added here so each verb's add() need not
        verb.add_argument("--quiet", action="store_true", help="no progress bars or status lines (results and errors still print)")
    return p


@functools.cache
def flag_actions(verb: str) -> dict:
    """dest -> argparse action of each option of `loram VERB` (what the flags derived from loram.settings became)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[verb]._actions if a.option_strings}


def main(argv: list[str] | None = None) -> int:
    from ..errors import LoramError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    saved_env: dict = {}
    try:
        # inside the try: argument types (e.g. --ratio abc) raise LoramError too; argparse's own
        # usage errors exit 2 with its usage line
        from .common import parse_with_config

        args = parse_with_config(parser, argv)  # --config FILE (train, align): knobs the flags leave out
        saved_env = _quiet_down(args, debug)
        repo = getattr(args, "push_to_hub", None)
        if repo:
            from ..hub import check_push

            check_push(repo)  # before any work: offline or a bad id is one line, not a lost hour
        rc = args.func(args)
        if repo and not rc and int(os.environ.get("RANK", "0")) == 0:
            from ..hub import push

            print(f"pushed {args.out} to {push(args.out, repo, args.command)}")
        return int(rc or 0)
    except LoramError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: the environment, not a bug in loram
        if debug:
            raise
        if _disk_full(e):
            return 2
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}: check the path, its permissions and the free disk space "
              "(--debug shows the traceback)", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("error: out of memory: use a smaller model, --quantize nf4, a smaller --micro-batch or --seq-len", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (Ctrl-C); no output was written (checkpoints already saved are kept)", file=sys.stderr)
        return 130
    except Exception as e:  # safetensors reports a full disk as SafetensorError, not OSError
        if debug or not _disk_full(e):
            raise
        return 2
    finally:  # the command is over: its output locks go (the process may live on, e.g. in tests)
        from ..io import unlock_all
        from ..progress import restore

        unlock_all()
        restore(saved_env)


def _disk_full(e: BaseException) -> bool:
    """Print the one-line disk-full error if ``e`` is one (outputs are atomic: nothing half-written is left)."""
    from ..io import disk_full, is_disk_full

    if not is_disk_full(e):
        return False
    print(f"error: {disk_full(getattr(e, 'filename', None), what='the command stopped, its output was not written')}",
          file=sys.stderr)
    return True


def _quiet_down(args, debug: bool) -> dict:
    """Bars iff stderr is a terminal, no --quiet, no --json (loram.progress); hide the library warnings
    a user cannot act on (each filter and the reason for it: progress.HIDDEN_WARNINGS); --debug shows them."""
    from .. import progress

    saved = progress.configure(quiet=args.quiet, json=bool(getattr(args, "json", False)))
    if not debug:
        progress.filter_warnings()
    return saved


if __name__ == "__main__":
    sys.exit(main())
