"""MkDocs hook: the reference pages are generated from the code, so they cannot fall behind it.

- **API**: one page per public module, ``::: module`` for mkdocstrings. The public modules are read from
  ``gradguard.__all__`` (its submodules, and the modules that define its classes and functions), the
  integrations package, and the few modules the concept pages point into (``EXTRA_MODULES``). A module
  added to ``__all__`` gets its page and its place in the navigation without anyone editing the docs.
- **Sphinx roles** in docstrings (``:class:`~x.Y``` and the like, which Markdown does not know) are shown
  as the code they name, and reST's ``::`` before a code block is dropped.
- **CLI**: ``<!-- cli-reference -->`` on ``reference/cli.md`` becomes one section per ``gradguard``
  command, from the Typer app's click commands (usage, arguments, options, their help and defaults).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[2]
API_DIR = "reference/api"
CLI_MARKER = "<!-- cli-reference -->"
SPHINX_ROLE = re.compile(r":(?:meth|func|class|attr|mod|obj|data|exc):(<code>)~?")
LITERAL_MARK = re.compile(r"<p>::</p>\s*")  # reST's "::" before a code block, left alone by Markdown
# Modules the concept pages explain that are not behind a name in ``gradguard.__all__``.
EXTRA_MODULES = ("gradguard.device_step", "gradguard.decide", "gradguard.history")


def _gradguard() -> Any:
    """This checkout's gradguard (not whichever one the environment's editable install points at)."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return importlib.import_module("gradguard")


def public_modules() -> list[str]:
    """The modules with an API page, in the order of the navigation."""
    gg = _gradguard()
    found: list[str] = []
    for name in gg.__all__:
        obj = getattr(gg, name)
        module = obj.__name__ if inspect.ismodule(obj) else obj.__module__
        top = ".".join(module.split(".")[:2])  # gradguard.explain.report.DoctorReport -> gradguard.explain
        if top not in found:
            found.append(top)
    integrations = importlib.import_module("gradguard.integrations")
    for info in pkgutil.iter_modules(integrations.__path__):  # listed, not imported: no framework needed
        if not info.name.startswith("_"):
            found.append(f"gradguard.integrations.{info.name}")
    found += [m for m in EXTRA_MODULES if m not in found]
    return sorted(found)


def _api_uri(module: str) -> str:
    return f"{API_DIR}/{module}.md"


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Put every public module's page under Reference > API in the navigation."""
    pages = [{"Overview": f"{API_DIR}/index.md"}] + [{f"{m}": _api_uri(m)} for m in public_modules()]
    for section in config.nav or []:
        for entries in section.values() if isinstance(section, dict) else []:
            for i, entry in enumerate(entries if isinstance(entries, list) else []):
                if isinstance(entry, dict) and entry.get("API") == f"{API_DIR}/index.md":
                    entries[i] = {"API": pages}
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Write the API pages (index and one per module) into the build; hand-written ones win."""
    gg = _gradguard()
    modules = public_modules()
    for module in modules:
        if files.get_file_from_path(_api_uri(module)) is None:
            page = f"::: {module}\n    options:\n      heading_level: 1\n"  # the module's heading is the page's title
            files.append(File.generated(config, _api_uri(module), content=page))
    rows = []
    for name in gg.__all__:
        obj = getattr(gg, name)
        if inspect.ismodule(obj):
            rows.append(f"| `gg.{name}` | module | [{obj.__name__}]({obj.__name__}.md) |")
        else:
            kind = "class" if inspect.isclass(obj) else "function"
            rows.append(f"| `gg.{name}` | {kind} | [{obj.__module__}.{name}][{obj.__module__}.{name}] |")
    index = (
        "# API reference\n\n"
        "Generated from the docstrings. `import gradguard as gg` gives these names (`gradguard.__all__`, "
        "the public API: see [Public API and versions](../../public-api.md)):\n\n"
        "| name | kind | documented at |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Modules: " + ", ".join(f"[`{m}`]({m}.md)" for m in modules) + ".\n"
    )
    if files.get_file_from_path(f"{API_DIR}/index.md") is None:
        files.append(File.generated(config, f"{API_DIR}/index.md", content=index))
    return files


def cli_reference() -> str:
    """Markdown for every ``gradguard`` command: usage, arguments and options, from the Typer app."""
    import typer  # its click objects are read by duck typing: recent typer ships its own copy of click

    _gradguard()
    from gradguard.cli import app

    group = typer.main.get_command(app)
    parts = []
    root = group.context_class(group, info_name="gradguard")
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        ctx = command.context_class(command, info_name=name, parent=root)
        usage = " ".join(command.collect_usage_pieces(ctx))
        rows = []
        for param in command.params:
            if param.name == "help":
                continue
            if param.param_type_name == "option":
                label = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
                default = "flag" if param.is_flag else "required" if param.required else f"`{param.default}`"
                default = "" if param.default is None and not param.is_flag else default
            else:
                label = f"`{param.name.upper()}`" + ("..." if param.nargs == -1 else "")
                default = "required" if param.required else "optional"
            helptext = (getattr(param, "help", None) or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {label} | {default} | {helptext} |")
        doc = inspect.cleandoc(command.help or "")
        table = "| argument / option | default | what |\n|---|---|---|\n" + "\n".join(rows)
        parts.append(f"## `gradguard {name}`\n\n{doc}\n\n```text\ngradguard {name} {usage}\n```\n\n{table}\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return LITERAL_MARK.sub("", SPHINX_ROLE.sub(r"\1", html))
