"""The README is the front page: short, the two set-up commands first, and every link it makes resolves.

Its code blocks run in ``test_docs_blocks.py`` like the docs pages'. The site's own links are checked by the
strict build (``test_docs_site.py``); the README is not part of the site, so its links into ``docs/`` are
checked here: the file exists, and so does the heading an anchor names.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 130  # "about 120 lines at most" (issue 22)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for match in LINK.finditer(page.read_text(encoding="utf-8")):
        target = match["target"]
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_the_readme_is_a_short_front_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES, f"the README has {len(text.splitlines())} lines"
    quick_start = text[text.index("## Quick start"):]
    first_block = quick_start[quick_start.index("```bash"): quick_start.index("```", quick_start.index("```bash") + 3)]
    assert "make demo" in first_block and "make test" in first_block


def test_every_link_of_the_readme_resolves() -> None:
    assert broken_links(README) == []
    assert len(LINK.findall(README.read_text(encoding="utf-8"))) >= 10  # it links into the docs


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The `demo`\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#the-demo) [gone](docs/b.md) [bad](docs/a.md#nope)\n", encoding="utf-8")
    assert broken_links(page) == ["docs/b.md: no such file", "docs/a.md#nope: no heading with that anchor"]
