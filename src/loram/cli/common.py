"""Argument helpers shared by the verbs."""

from __future__ import annotations

# the validators every verb uses as argparse type= (one range per knob, see loram.validate)
from ..validate import ATTN_RATIO, COUNT, COUNT_OR_OFF, DROPOUT, NON_NEGATIVE, POSITIVE, RATIO, SEED, SEQ_LEN, Number  # noqa: F401


def add_out(p, what: str = "output folder") -> None:
    from ..hub import PUSH_VERBS

    p.add_argument("-o", "--out", required=True, help=f"{what} (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    if p.prog.split()[-1] in PUSH_VERBS:
        p.add_argument("--push-to-hub", metavar="REPO_ID", help=f"then upload the {what} (model card included) to this "
                       "Hugging Face Hub repo (created private if new)")


def add_verify_base(p, record: bool) -> None:
    """--verify-base sampled|full: record (prune, import-plan) or check (recover, merge) the base's full digest."""
    what = ("also record a sha256 of every byte of the base's weight files in the plan, so `loram recover/merge "
            "--verify-base full` can check it" if record else
            "also compare every byte of the base's weight files with the digest the plan recorded (needs a plan made "
            "with --verify-base full)")
    p.add_argument("--verify-base", default="sampled", choices=["sampled", "full"],
                   help=f"sampled (default): fingerprint from 8 sampled rows per tensor; full: {what}. "
                        "File hashes are cached under $XDG_CACHE_HOME/loram by path, size and mtime")


def name_numbers(parser) -> None:
    """Give every numeric validator (argparse ``type=``) its flag's name, for its one-line message.

    Walks the verbs' subparsers; the shared validators (COUNT, SEED, ...) are copied, not changed."""
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "add_parser") else ():
            name_numbers(sub)
        if isinstance(action.type, Number) and action.option_strings:
            action.type = action.type.named(max(action.option_strings, key=len))


def table(rows: list[tuple[str, str]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


# ---- --config FILE.yaml: a stage's knobs from a file, the flags on the command line winning ------------
CONFIG_VERBS = ("train", "align")  # the verbs whose knobs are a recipe section


def add_config(p, stage: str) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help=f"{stage} knobs from a YAML mapping, named as in a recipe's "
                   f"`{stage}:` section (lr: 2e-4, data: [a.json]); flags given on the command line win")


def _value_after(argv: list[str], flag: str) -> str | None:
    for i, t in enumerate(argv):
        if t == flag and i + 1 < len(argv):
            return argv[i + 1]
        if t.startswith(flag + "="):
            return t[len(flag) + 1:]
    return None


def parse_with_config(parser, argv: list[str]):
    """``parser.parse_args(argv)``, with the knobs of ``--config FILE`` filling what the command line left out.

    The file is read like a recipe section (yamlfile.read_yaml, settings.check_recipe_section: the same
    names, validators and messages). A flag counts as given when it appears in ``argv``: it is found by
    parsing again with every default suppressed, so a flag set to its default value still wins."""
    import argparse

    path = _value_after(argv, "--config")
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    verb = next((t for t in argv if t in sub_action.choices), None)
    if path is None or verb not in CONFIG_VERBS:
        return parser.parse_args(argv)
    from pathlib import Path

    from ..errors import LoramError
    from ..settings import check_recipe_section, recipe_keys
    from ..yamlfile import read_yaml

    p = Path(path)
    if not p.is_file():
        raise LoramError(f"config file {p} does not exist: check the path")
    doc = read_yaml(p, "config file")
    if not isinstance(doc, dict):
        raise LoramError(f"config file {p} is not a mapping of {verb} knobs: write e.g. `lr: 2e-4` lines")
    bad = set(doc) - recipe_keys(verb)
    if bad:
        raise LoramError(f"config file {p}: unknown {verb} knob(s) {sorted(bad)}: allowed {', '.join(sorted(recipe_keys(verb)))}")
    try:
        cfg = check_recipe_section(verb, doc)
    except LoramError as e:
        raise LoramError(f"config file {p}: {e}") from None
    sub = sub_action.choices[verb]
    saved = [(a, a.default, a.required) for a in sub._actions]
    try:
        for a in sub._actions:
            a.required = a.required and a.dest not in cfg  # the file may give a required knob (--data)
        args = parser.parse_args(argv)
        for a in sub._actions:
            a.default, a.required = argparse.SUPPRESS, False
        given = set(vars(parser.parse_args(argv)))
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
    for k, v in cfg.items():
        if k not in given:
            setattr(args, k, v)
    return args


def add_device(p) -> None:
    """--device: where the command computes (loram.device: cuda:LOCAL_RANK when CUDA is there, else cpu)."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda, cuda:N or mps (default: cuda:LOCAL_RANK when CUDA is available, else cpu); "
                        "layer-streamed stages keep one layer there")
