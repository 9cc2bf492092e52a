"""Every code block in the documentation runs, so the examples cannot drift from the code.

The pages are ``README.md``, ``CHANGELOG.md`` and ``docs/**/*.md``. A fenced block is checked by its language:

- ``python``: executed. A page's blocks run in order in one namespace (a later block may use an earlier
  block's names), in a temporary folder (files the snippets write land there). A page that assumes a
  user's model, optimizer and data says so with ``<!-- docs-test: setup NAME -->``; the runner makes them
  first (``docs_fixtures.py``). A block that only includes a tested file (``--8<-- "examples/x.py:part"``,
  pymdownx.snippets) is checked to include an existing part of a file that a test runs.
- ``bash``: each command is checked without running it (they start minutes-long jobs): ``make`` targets
  exist in the Makefile, ``gradguard``/``python -m gradguard`` commands and their options exist in the CLI,
  ``python path.py --opt`` scripts exist and take those options, ``pip install`` extras exist.
- ``json``: parsed. ``text``: output shown to the reader; one preceded by ``<!-- docs-test: output -->`` must
  be what the python block before it printed (doctest's rules: ``...`` matches anything, whitespace runs
  compare equal), so "what you will see" cannot drift either.
- A block preceded by ``<!-- docs-test: skip REASON -->`` is not run; the reasons are listed in
  ``test_skipped_blocks_are_few_and_say_why`` so that the set stays small.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_fixtures import SETUPS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")],
    key=lambda p: str(p.relative_to(ROOT)),
)
PAGES = [p for p in PAGES if p.exists()]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<verb>skip|setup|output)\b\s*(?P<arg>.*?)\s*-->")
INCLUDE = re.compile(r'^--8<--\s+"(?P<path>[^":]+)(?::(?P<part>[\w-]+))?"\s*$')
LANGUAGES = {"python", "bash", "json", "text"}
# Blocks not run, by page: each says why in its skip comment. Adding one here is a decision to review.
MAX_SKIPPED = 8


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, when marked skip
    output: bool = False  # a text block marked as the output of the python block before it

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def blocks_of(page: Path) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks (with their skip marks) and its setups."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    setups = [m["arg"] for m in DIRECTIVE.finditer("\n".join(lines)) if m["verb"] == "setup"]
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mark = DIRECTIVE.search(before)
        skip = mark["arg"] if mark and mark["verb"] == "skip" else None
        output = bool(mark and mark["verb"] == "output")
        blocks.append(Block(page, i + 1, match["lang"] or "", "\n".join(body) + "\n", skip, output))
        i = j + 1
    return blocks, setups


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- python --------------------------------------------------------------------------------------------


def included(block: Block) -> list[tuple[str, str | None]] | None:
    """The (path, part) pairs of a block made only of snippet includes, else None."""
    lines = [line for line in block.code.splitlines() if line.strip()]
    matches = [INCLUDE.match(line.strip()) for line in lines]
    if not lines or not all(matches):
        return None
    return [(m["path"], m["part"]) for m in matches if m]


def check_include(block: Block, path: str, part: str | None) -> None:
    file = ROOT / path
    assert file.is_file(), f"{block.where}: includes {path}, which does not exist"
    text = file.read_text(encoding="utf-8")
    if part is not None:
        assert f"--8<-- [start:{part}]" in text and f"--8<-- [end:{part}]" in text, (
            f"{block.where}: includes part {part!r} of {path}, which has no such part"
        )
    tests = " ".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    assert file.stem in tests, f"{block.where}: includes {path}, which no test runs"


def run_python(blocks: list[Block], setups: list[str], tmp_path: Path) -> None:
    environment = dict(os.environ)  # a setup may play torchrun's part (RANK, WORLD_SIZE, ...)
    try:
        run_blocks(blocks, setups)
    finally:
        os.environ.clear()
        os.environ.update(environment)


def run_blocks(blocks: list[Block], setups: list[str]) -> None:
    """Run the python blocks in order in one namespace; check each marked output against what was printed."""
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for name in setups:
        assert name in SETUPS, f"unknown setup {name!r}; known: {sorted(SETUPS)}"
        namespace.update(SETUPS[name]())
    printed: str | None = None
    for block in blocks:
        if block.output:
            assert printed is not None, f"{block.where}: an output block must follow a python block"
            check_output(block, printed)
            continue
        if block.lang != "python":
            continue
        parts = included(block)
        if parts is not None:
            for path, part in parts:
                check_include(block, path, part)
            printed = None
            continue
        stdout = io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(block.code, block.where, "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{block.where}: the python block raised {error!r}\n{block.code}") from error
        printed = stdout.getvalue()


def check_output(block: Block, printed: str) -> None:
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    assert checker.check_output(block.code, printed, flags), (
        f"{block.where}: the page shows\n{block.code}but the block before it printed\n{printed}"
    )


# --- bash ------------------------------------------------------------------------------------------------


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([\w.-]+):", text, flags=re.MULTILINE))


def cli_options() -> dict[str, set[str]]:
    """``gradguard`` command -> its option strings (from the Typer app)."""
    import typer

    from gradguard.cli import app

    group = typer.main.get_command(app)
    return {
        name: {opt for p in command.params for opt in [*p.opts, *p.secondary_opts] if opt.startswith("-")}
        for name, command in group.commands.items()  # type: ignore[attr-defined]
    } | {"--help": set()}


def extras() -> set[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as file:
        return set(tomllib.load(file)["project"]["optional-dependencies"])


def check_command(where: str, line: str, cli: dict[str, set[str]]) -> None:
    words = shlex.split(line, comments=True)
    if not words:
        return

    def flags(args: list[str]) -> list[str]:
        return [w.split("=")[0] for w in args if w.startswith("-")]

    if words[0] == "make":
        missing = set(words[1:]) - make_targets()
        assert not missing, f"{where}: `{line}`: no make target {sorted(missing)}"
    elif words[0] == "gradguard" or words[:3] == ["python", "-m", "gradguard"]:
        args = words[1:] if words[0] == "gradguard" else words[3:]
        assert args and args[0] in cli, f"{where}: `{line}`: no gradguard command {args[:1]}; have {sorted(cli)}"
        unknown = set(flags(args[1:])) - cli[args[0]] - {"--help"}
        assert not unknown, f"{where}: `{line}`: gradguard {args[0]} has no option {sorted(unknown)}"
    elif words[0] == "python" and words[1].endswith(".py"):
        script = ROOT / words[1]
        assert script.is_file(), f"{where}: `{line}`: no script {words[1]}"
        text = script.read_text(encoding="utf-8")
        unknown = [f for f in flags(words[2:]) if f"'{f}'" not in text and f'"{f}"' not in text]
        assert not unknown, f"{where}: `{line}`: {words[1]} takes no option {unknown}"
    elif words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
        for word in words:
            for extra in re.findall(r"\[([\w,-]+)\]", word):
                missing = set(extra.split(",")) - extras()
                assert not missing, f"{where}: `{line}`: no extra {sorted(missing)} in pyproject.toml"
    else:
        raise AssertionError(
            f"{where}: `{line}`: the runner does not know how to check this command; check it here, or mark "
            "the block <!-- docs-test: skip REASON -->"
        )


def check_bash(block: Block, cli: dict[str, set[str]]) -> None:
    logical = block.code.replace("\\\n", " ")
    for number, line in enumerate(logical.splitlines()):
        check_command(f"{block.where}+{number + 1}", line.strip(), cli)


# --- the tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_block_of_the_page_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks, setups = blocks_of(page)
    live = [b for b in blocks if b.skip is None]
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in live if b.lang not in LANGUAGES]
    assert not unknown, f"blocks need a language the runner checks ({sorted(LANGUAGES)}): {unknown}"
    monkeypatch.chdir(tmp_path)
    cli = cli_options() if any(b.lang == "bash" for b in live) else {}
    for block in live:
        if block.lang == "bash":
            check_bash(block, cli)
        elif block.lang == "json":
            json.loads(block.code)
    run_python([b for b in live if b.lang == "python" or b.output], setups, tmp_path)


def test_skipped_blocks_are_few_and_say_why() -> None:
    skipped = [b for page in PAGES for b in blocks_of(page)[0] if b.skip is not None]
    assert all(len(b.skip or "") >= 20 for b in skipped), [b.where for b in skipped if len(b.skip or "") < 20]
    assert len(skipped) <= MAX_SKIPPED, "\n".join(f"{b.where}: {b.skip}" for b in skipped)


def test_the_runner_finds_blocks_and_fails_on_a_broken_one(tmp_path: Path) -> None:
    """The runner can fail: a python block that raises, an unknown make target and a missing option do."""
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-test: setup loop -->\n```python\nimport gradguard as gg\nguard = gg.Guard(model, optimizer)\n"
        "```\n\n<!-- docs-test: skip not runnable, a fragment for the reader -->\n```python\nundefined_name\n```\n"
        "```python\nguard.no_such_method()\n```\n",
        encoding="utf-8",
    )
    blocks, setups = blocks_of(page)
    assert [(b.line, b.skip is None) for b in blocks] == [(2, True), (8, False), (11, True)]
    with pytest.raises(AssertionError, match="no_such_method"):
        run_python([b for b in blocks if b.skip is None], setups, tmp_path)
    cli = cli_options()
    with pytest.raises(AssertionError, match="no make target"):
        check_command("x", "make no-such-target", cli)
    with pytest.raises(AssertionError, match="has no option"):
        check_command("x", "gradguard lab --no-such-option", cli)
    check_command("x", "gradguard lab --quick --out my-lab  # a comment", cli)
    shown = Block(page, 20, "text", "{'a': 1, ...}\n", None, output=True)
    check_output(shown, "{'a': 1, 'b': 2}\n")
    with pytest.raises(AssertionError, match="the page shows"):
        check_output(shown, "{'a': 2}\n")


def test_pages_cover_the_docs_tree() -> None:
    """The runner reads every page the site builds from (docs/**/*.md) and the README."""
    assert ROOT / "README.md" in PAGES
    assert len([p for p in PAGES if "docs" in p.parts]) >= 20
    assert os.path.isfile(ROOT / "mkdocs.yml")
