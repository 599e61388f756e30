"""The docs are tested like code (as litgpt's test_readme does): every ```python block of README.md and
docs/*.md runs, and every `loram ...` command line of a ```bash / ```sh / ```console block parses with
loram's own argparse parser, so a renamed flag or a changed library signature breaks a test, not a user.

What a block may leave to this test, and how the test fills it in (keep the docs readable: a real hub id
or file name in a block is fine when it is listed here):

- the hub ids in MODELS become a tiny random model (loram.testing.save_tiny);
- a `--config FILE.yaml` of a command line becomes a file that gives the required knobs (`data:`);
- the block runs in an empty folder that holds `data.jsonl` (a few Alpaca rows), as a user's would;
- a block that needs what a test cannot have (a GPU, vLLM, a 70B checkpoint, real data) says so on a line
  `# doc-test: skip (needs ...)`, which this test reports as a skip with that reason.

In shell blocks, a command is `loram VERB ...`, `python -m loram VERB ...` or a launcher's `-m loram VERB ...`
(torchrun, accelerate launch); lines are joined at a trailing backslash, split at `&&`, `;` and `|`, and a
`# comment` is dropped. In ```console blocks only lines starting with `$ ` are commands. A literal `...`
argument (an elided list in prose) is dropped before parsing; everything else must parse as written.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-2-7b-hf")
SKIP = re.compile(r"#\s*doc-test:\s*skip\s*\((.+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL = {"bash", "sh", "shell", "console"}


def blocks(lang: set[str]) -> list[tuple[str, int, str, str]]:
    """(file, first line, language, text) of every fenced block whose language is in ``lang``."""
    found = []
    for doc in DOCS:
        lines, inside = doc.read_text().splitlines(), None
        for i, line in enumerate(lines, 1):
            m = FENCE.match(line)
            if m and inside is None:
                inside, start, body = m.group(1), i, []
            elif line.startswith("```") and inside is not None:
                if inside in lang:
                    found.append((doc.relative_to(ROOT).as_posix(), start, inside, "\n".join(body)))
                inside = None
            elif inside is not None:
                body.append(line)
    return found


def commands(lang: str, text: str) -> list[list[str]]:
    """The loram argument lists (after `loram`) of a shell block."""
    if lang == "console":
        text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("$ "))
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        part: list[str] = []
        for w in [*words, "&&"]:
            if w not in ("&&", ";", "|", "||"):
                part.append(w)
                continue
            args = loram_args(part)
            if args is not None:
                out.append([a for a in args if a != "..."])
            part = []
    return out


def loram_args(words: list[str]) -> list[str] | None:
    """The arguments after `loram` in one simple command, or None when it is not a loram command."""
    for i, w in enumerate(words):
        if w == "loram" and (i == 0 or "=" in words[i - 1]):  # `loram ...` or `VAR=1 loram ...`
            return words[i + 1:]
        if w == "loram" and i > 0 and words[i - 1] == "-m":  # python -m loram, torchrun ... -m loram
            return words[i + 1:]
    return None


SHELL_COMMANDS = [(f, n, args) for f, n, lang, text in blocks(SHELL) for args in commands(lang, text)]
PYTHON_BLOCKS = blocks({"python"})


def test_the_docs_have_commands_and_python_blocks():
    # the collection itself works: a broken fence regex would make every other test here vacuous
    assert len(SHELL_COMMANDS) > 50
    assert any(f == "README.md" for f, _, _ in SHELL_COMMANDS)
    assert any(f == "README.md" for f, *_ in PYTHON_BLOCKS)
    assert {args[0] for _, _, args in SHELL_COMMANDS if args and not args[0].startswith("-")} >= {
        "prune", "train", "recover", "merge", "eval", "plan", "run", "demo"}


@pytest.mark.parametrize("where,line,args", SHELL_COMMANDS, ids=[f"{f}:{n}:{' '.join(a[:2])}" for f, n, a in SHELL_COMMANDS])
def test_loram_command_line_parses(where, line, args, tmp_path):
    from loram.cli import build_parser
    from loram.cli.common import parse_with_config
    from loram.errors import LoramError

    if "--config" in args:  # `--config FILE.yaml` supplies required knobs (--data): a file that gives them stands in
        i = args.index("--config") + 1
        (tmp_path / "c.yaml").write_text("data: [data.jsonl]\n")
        args = [*args[:i], str(tmp_path / "c.yaml"), *args[i + 1:]]
    try:
        ns = parse_with_config(build_parser(), args)
    except SystemExit as e:  # argparse: unknown flag, missing argument, bad choice
        pytest.fail(f"{where}:{line}: `loram {shlex.join(args)}` does not parse (exit {e.code})")
    except LoramError as e:  # a validating type: --ratio 1.5, --device gpu, ...
        pytest.fail(f"{where}:{line}: `loram {shlex.join(args)}` is refused: {e}")
    assert ns.command


def test_a_renamed_flag_would_fail():
    # the property the test above relies on: argparse refuses what it does not know, it does not ignore it
    from loram.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "BASE", "-o", "O", "--ratoi", "0.5"])


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from loram.testing import save_tiny

    return save_tiny(tmp_path_factory.mktemp("docs") / "tiny", "llama-gqa")


def _prepare(code: str, tiny: Path) -> str:
    for name in MODELS:
        code = code.replace(repr(name), repr(str(tiny))).replace(f'"{name}"', repr(str(tiny)))
    return code


@pytest.mark.parametrize("where,line,lang,code", PYTHON_BLOCKS, ids=[f"{f}:{n}" for f, n, _, _ in PYTHON_BLOCKS])
def test_python_block_runs(where, line, lang, code, tiny_base, tmp_path, monkeypatch):
    skip = SKIP.search(code)
    if skip:
        pytest.skip(f"{where}:{line}: {skip.group(1)}")
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": f"add {a} {b}", "input": "", "output": str(a + b)} for a in range(6) for b in range(6)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    exec(compile(_prepare(code, tiny_base), f"{where}:{line}", "exec"), {"__name__": "__doc_block__"})
    if where == "README.md" and "recover(" in code:
        check_quickstart_outputs(tmp_path / "runs", tiny_base)


def check_quickstart_outputs(runs: Path, tiny: Path) -> None:
    """What the quickstart's comments promise (a block that ran but wrote nothing would pass otherwise)."""
    assert (runs / "pruned" / "loram_plan.json").is_file()
    assert (runs / "adapter" / "adapter_config.json").is_file()
    assert json.loads((runs / "recovered" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    merged, base = (json.loads((d / "config.json").read_text()) for d in (runs / "merged", tiny))
    assert merged["intermediate_size"] == base["intermediate_size"]  # the original's shapes, not the pruned ones


def test_every_test_the_reliability_index_names_exists():
    """docs/reliability.md names a test for each failure mode: a renamed or deleted test must take its row
    with it (module names such as `test_budget.py` are files, the rest are functions in tests/)."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    files = set(re.findall(r"\b(test_\w+)\.py\b", text))
    functions = set(re.findall(r"\b(test_\w+)\b", text)) - files
    assert len(functions) > 100
    assert not sorted(f for f in files if not (ROOT / "tests" / f"{f}.py").exists())
    defined = set(re.findall(r"^\s*(?:async )?def (test_\w+)", "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py")), re.M))
    assert not sorted(functions - defined)


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    bad = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # links inside code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
                if anchor not in slugs:
                    bad.append(f"{doc.name}: {target} (no such heading)")
    assert not bad
