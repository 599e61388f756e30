"""The `loram` command line: one verb per paper stage, each a thin layer over one library function.

User errors (LoramError, bad arguments) print one line `error: ...` and exit 2; `--debug` shows
the traceback. Each verb lives in its own module here and registers itself in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# verb modules, in the order `loram --help` lists them
COMMANDS = ["prune", "train", "recover", "merge", "generate"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loram", description="Train small, infer large: LoRA on pruned LLMs, recovered to the original.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"loram.cli.{name}").add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import LoramError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except LoramError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (Ctrl-C); no output was written (checkpoints already saved are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
