"""The documentation site: it builds in strict mode, and it works in a browser.

The site is built once for the module (``mkdocs build --strict``, as ``make docs`` does, into a temporary
folder): a broken link, a missing page, an unresolved API reference or a docstring griffe cannot read fails
the build. Then headless Chromium opens the built site over a loopback HTTP server and checks what a reader
sees: no console errors, the search (client-side JavaScript, in a web worker) finds ``TrainingDiverged``,
and the Guard's API page lists every constructor parameter with its description.
"""

from __future__ import annotations

import functools
import http.server
import inspect
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chromium_devtools import Chromium  # noqa: E402

import gradguard as gg  # noqa: E402

pytest.importorskip("mkdocs", reason="the docs extra is not installed (make test installs it)")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed (make test installs it)")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (make test installs Debian's chromium where apt-get is available)",
)


def build(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=config.parent,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = build(ROOT / "mkdocs.yml", out)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    return out


def test_the_site_builds_in_strict_mode_with_every_page(site: Path) -> None:
    for page in ["index", "getting-started", "how-to/fsdp2", "concepts/recovery", "troubleshooting",
                 "benchmarks", "lab", "public-api", "changelog", "reference/cli", "reference/api/index"]:  # fmt: skip
        assert (site / f"{page}.html").is_file(), page
    index = (site / "reference/api/index.html").read_text(encoding="utf-8")
    for name in gg.__all__:
        assert f"gg.{name}</code>" in index, f"gradguard.{name} is missing from the API index"
    cli = (site / "reference/cli.html").read_text(encoding="utf-8")
    for command in ("demo", "lab", "doctor", "replay", "report"):
        assert f"gradguard {command}</code>" in cli
    assert "--quick" in cli and "The small grid" in cli  # options and their help, from the Typer app


def test_strict_mode_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The validation settings make a broken link an error (a small site with mkdocs.yml's validation)."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    validation = config[config.index("validation:"): config.index("theme:")]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# x\n\nSee [the page](missing.md).\n", encoding="utf-8")
    (tmp_path / "mkdocs.yml").write_text(f"site_name: x\nstrict: true\n{validation}", encoding="utf-8")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and "missing.md" in done.stderr


# --- in headless Chromium ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site over HTTP on the loopback interface (a worker cannot load from file:// URLs)."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    assert CHROMIUM is not None
    chromium = Chromium(CHROMIUM, tmp_path / "profile")
    yield chromium
    chromium.close()


@needs_chromium
def test_pages_open_without_console_errors(served: str, browser: Chromium) -> None:
    for page in ["index.html", "getting-started.html", "concepts/guarded-step.html",
                 "reference/api/gradguard.guard.html", "reference/cli.html", "troubleshooting.html"]:  # fmt: skip
        browser.open(f"{served}/{page}")
        assert browser.evaluate("document.querySelector('h1') !== null"), page
    assert browser.console == []


@needs_chromium
def test_the_console_probe_sees_errors(served: str, browser: Chromium) -> None:
    """The check above can fail: an error a page logs and a resource it cannot load are both seen."""
    browser.open(f"{served}/index.html")
    browser.evaluate("console.error('probe'); document.body.appendChild(document.createElement('img')).src = 'x.png'")
    browser.wait_for("document.querySelector('img[src=\"x.png\"]').complete")
    assert any("probe" in line for line in browser.console)
    assert any("404" in line for line in browser.console), browser.console


@needs_chromium
def test_search_finds_training_diverged(served: str, browser: Chromium) -> None:
    browser.open(f"{served}/index.html?q=TrainingDiverged")
    found = browser.wait_for("document.querySelectorAll('.md-search-result__item').length > 0", seconds=60)
    meta = browser.evaluate("document.querySelector('.md-search-result__meta').textContent.trim()")
    assert found, f"no search result; the search says {meta!r}"
    links = browser.evaluate("[...document.querySelectorAll('.md-search-result__item a')].map(a => a.href)")
    assert any("troubleshooting.html" in link and "#trainingdiverged-what-now" in link for link in links), links
    assert any("#gradguard.recover.TrainingDiverged" in link or "#gradguard.guard.TrainingDiverged" in link
               for link in links), links  # fmt: skip
    assert browser.console == []


@needs_chromium
def test_the_guard_api_page_lists_its_parameters_with_their_docs(served: str, browser: Chromium) -> None:
    browser.open(f"{served}/reference/api/gradguard.guard.html")
    items = browser.evaluate(
        """(() => {
            const doc = document.getElementById('gradguard.guard.Guard').closest('.doc-class');
            const title = [...doc.querySelectorAll('.doc-section-title')].find(t => t.textContent === 'Parameters:');
            const list = title.parentElement.nextElementSibling;
            return [...list.querySelectorAll(':scope > li')].map(li => [
                li.querySelector('b code').textContent, li.querySelector('.doc-md-description').textContent.trim()]);
        })()"""
    )
    documented = dict(items)
    parameters = [p for p in inspect.signature(gg.Guard).parameters]
    assert parameters and set(parameters) <= set(documented), set(parameters) - set(documented)
    assert all(len(documented[p]) > 10 for p in parameters), documented
    assert documented["on_nonfinite"].startswith("response to NaN/Inf gradients or loss")
    assert browser.console == []
