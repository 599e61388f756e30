"""YAML files loram reads (recipes, `--config` files) and `KEY=VALUE` overrides of them.

The loader is PyYAML's SafeLoader, bounded: a file of at most 1 MB, no aliases (a few hundred bytes
of nested aliases expand to gigabytes: the "billion laughs"), nesting at most 16 deep, and YAML 1.2
numbers (``1:4`` stays text, ``1e-4`` is a float). Overrides (``train.lr=2e-4``) read their value with
the same loader, so a value means on the command line what it means in the file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from .errors import LoramError

MAX_RECIPE_BYTES = 1 << 20  # a recipe names files and knobs; 1 MB is far more than any needs
MAX_DEPTH = 16  # a recipe nests 3-4 levels (stage -> eval -> name: file)


class _Refused(Exception):
    """The YAML uses something a recipe may not (aliases, deep nesting): the reason, for one line."""


@functools.cache
def _loader():
    """yaml.SafeLoader, bounded, with YAML 1.2 numbers.

    Aliases are refused (a few hundred bytes of nested aliases expand to gigabytes: the
    "billion laughs"), nesting is bounded, and numbers follow YAML 1.2: ``1:4`` stays the text
    "1:4" (YAML 1.1 reads it as the base-60 integer 64) and ``1e-4`` is a float."""
    import yaml

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    class RecipeLoader(yaml.SafeLoader):
        yaml_implicit_resolvers = {k: [(t, rx) for t, rx in v if t not in (int_tag, float_tag)]  # noqa: RUF012 - PyYAML API
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise _Refused("uses a YAML alias (*name): write the values out (recipes do not expand aliases)")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels: a recipe is base, workdir and one mapping per stage")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    RecipeLoader.add_implicit_resolver(int_tag, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
    RecipeLoader.add_implicit_resolver(float_tag, re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),  # a dot or an exponent: 12 is an int, 010 text
        list("-+0123456789."))
    return RecipeLoader


def read_yaml(p: Path, what: str = "recipe"):
    """The YAML document in ``p`` (a recipe, or ``what`` in messages), read within bounds (size, aliases, nesting)."""
    import yaml

    with open(p, "rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise LoramError(f"{what} {p} is larger than {MAX_RECIPE_BYTES >> 20} MB: a {what} names data files, it does not hold data")
    try:
        return yaml.load(raw.decode("utf-8"), Loader=_loader())  # a SafeLoader subclass
    except _Refused as e:
        raise LoramError(f"{what} {p} {e}") from None
    except UnicodeDecodeError:
        raise LoramError(f"{what} {p} is not UTF-8 text: save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise LoramError(f"{what} {p} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None


def parse_value(text: str):
    """A command-line value as the YAML loader reads it in a file (``2e-4`` a float, ``4:28`` text)."""
    import yaml

    if text == "":
        return None
    try:
        return yaml.load(text, Loader=_loader())
    except (_Refused, yaml.YAMLError):
        return text  # not a YAML scalar (e.g. "a: b"): the text itself


def apply_overrides(doc: dict, overrides: list[str] | tuple = (), where: str = "recipe") -> dict:
    """``doc`` with each ``dotted.key=value`` set (intermediate mappings created); one line for a bad one.

    ``train.lr=2e-4`` sets doc["train"]["lr"]; ``base=other`` a top-level key. The keys themselves are
    checked by whoever validates ``doc`` (an unknown knob fails there, with the allowed names)."""
    for o in overrides:
        key, eq, value = o.partition("=")
        parts = key.split(".")
        if not eq or not key or any(not p.strip() for p in parts):
            raise LoramError(f"override {o!r} is not KEY=VALUE: e.g. train.lr=2e-4 or prune.ratio=0.65")
        node = doc
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise LoramError(f"override {o!r}: {'.'.join(parts[:i + 1])} in the {where} is {nxt!r}, not a mapping: "
                                 f"override {'.'.join(parts[:i + 1])} itself")
            node = nxt
        node[parts[-1]] = parse_value(value)
    return doc
