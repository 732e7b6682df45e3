"""Write the reference pages from the code, so they cannot drift from it.

mkdocs-gen-files runs this file at every ``mkdocs build`` (no network: it only imports
manymodels and builds an empty application): the CLI from the Typer app, the server
settings and spec fields from their pydantic models (each field's docstring), the HTTP
API from the application's OpenAPI document, error codes, HTTP statuses and exit codes
from the exception tree, and one mkdocstrings page per public module.
``tests/test_docs.py`` imports the functions below and checks every command, setting and
route is on its page.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

#: Public modules with a page of their own in the Python API reference.
PYTHON_MODULES = [
    "manymodels",
    "manymodels.runtime",
    "manymodels.errors",
    "manymodels.specs",
    "manymodels.datasets",
    "manymodels.bundle",
    "manymodels.registry",
    "manymodels.storage",
    "manymodels.export",
    "manymodels.forecast",
    "manymodels.forecast.stats",
    "manymodels.batch",
    "manymodels.serve",
    "manymodels.client",
    "manymodels.monitor",
    "manymodels.retrain",
    "manymodels.report",
    "manymodels.image",
]


# --------------------------------------------------------------------------------- CLI


def cli_commands() -> list[tuple[str, Any]]:
    """Every command of the Typer app as (full name, click command), groups included."""
    import typer.main

    from manymodels.cli import app

    root = typer.main.get_command(app)
    out: list[tuple[str, Any]] = []

    def walk(name: str, command: Any) -> None:
        out.append((name, command))
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            for sub_name in sorted(command.commands):
                walk(f"{name} {sub_name}", command.commands[sub_name])

    walk("manymodels", root)
    return out


def _param_row(param: Any) -> str:
    if param.param_type_name == "argument":
        names = f"`{param.human_readable_name}`"
        kind = "argument" + ("" if param.required else ", optional")
    else:
        flags = list(param.opts) + list(param.secondary_opts)
        names = " / ".join(f"`{flag}`" for flag in flags)
        kind = "option" + (", required" if param.required else "")
    default = ""
    if not param.required and param.default not in (None, (), [], False) \
            and not callable(param.default):
        default = f"`{param.default}`"
    help_text = _cell(getattr(param, "help", None) or "")
    return f"| {names} | {kind} | {default} | {help_text} |"


def cli_markdown() -> str:
    """The CLI reference: usage, help and every argument and option of each command."""
    from manymodels.cli import EXIT_CODES

    lines = ["# Command line", "",
             "Generated from the Typer app (`manymodels.cli.app`) by `docs/gen_reference.py`.",
             "Every command prints one line and exits with the code of its error class on "
             "failure (see [Errors and exit codes](errors.md)).", ""]
    lines += ["| command | what |", "|---|---|"]
    for name, command in cli_commands()[1:]:
        lines.append(f"| [`{name}`](#{_anchor(name)}) | {_cell(_first_line(command))} |")
    lines.append("")
    for name, command in cli_commands():
        lines += [f"## `{name}` {{#{_anchor(name)}}}", ""]
        usage = " ".join(command.collect_usage_pieces(command.context_class(
            command, info_name=name)))
        lines += ["```text", f"{name} {usage}".rstrip(), "```", ""]
        if command.help:
            lines += [_clean_help(command.help), ""]
        params = [p for p in command.params if not getattr(p, "hidden", False)
                  and p.name not in ("help",)]
        if params:
            lines += ["| parameter | kind | default | help |", "|---|---|---|---|"]
            lines += [_param_row(p) for p in params]
            lines.append("")
    del EXIT_CODES
    return "\n".join(lines)


def _first_line(command: Any) -> str:
    text = command.short_help or command.help or ""
    return _clean_help(text).split("\n\n")[0].replace("\n", " ")


def _clean_help(text: str) -> str:
    """Click's help with its ``\\b`` no-rewrap markers turned into plain paragraphs."""
    return textwrap.dedent(text).replace("\b\n", "").strip()


def _anchor(name: str) -> str:
    return name.replace(" ", "-")


def _cell(text: str) -> str:
    """``text`` on one line of a Markdown table: reST roles and literals made Markdown."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", str(text)).replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")


# ------------------------------------------------------------------------------ settings


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a class (pydantic keeps none of them)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, BaseModel) or not klass.__module__.startswith("manymodels"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def model_fields(cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted name, field info, docstring) of every field, nested models flattened."""
    docs = field_docs(cls)
    for name, info in cls.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from model_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info, docs.get(name, "")


def _default(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.default is PydanticUndefined:
        return "required" if info.default_factory is None else "`{}`"
    if info.default is None:
        return "–"
    return f"`{info.default!r}`" if isinstance(info.default, str) else f"`{info.default}`"


def _type(info: Any) -> str:
    return " \\| ".join(_type_parts(info.annotation))


def _type_parts(annotation: Any) -> list[str]:
    """An annotation as Markdown alternatives: a Literal's values, a union's members."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [f"`{value!r}`" for value in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType):
        return [part for arg in typing.get_args(annotation) for part in _type_parts(arg)]
    if annotation is type(None):
        return ["`None`"]
    text = str(annotation) if origin is not None else getattr(annotation, "__name__", None)
    return [_cell(f"`{(text or str(annotation)).replace('typing.', '')}`")]


def model_table(cls: type[BaseModel], env_prefix: str | None = None,
                flags: dict[str, str] | None = None) -> list[str]:
    """One row per field: name, (environment variable, flag,) type, default, docstring."""
    head = ["field", *(["environment", "flag"] if env_prefix else []), "type", "default",
            "meaning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, info, doc in model_fields(cls):
        row = [f"`{name}`"]
        if env_prefix:
            row.append(f"`{env_prefix}{name.upper().replace('.', '__')}`")
            section, _, leaf = name.rpartition(".")
            flag = (flags or {}).get(leaf) or ((flags or {}).get(section) if leaf == "mode" else None)
            row.append(f"`{flag}`" if flag else "")
        row += [_type(info), _default(info), _cell(doc)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def serve_flags() -> dict[str, str]:
    """``manymodels serve``'s flag for each setting it sets (same name, dashes)."""
    serve = dict(cli_commands())["manymodels serve"]
    return {param.name: param.opts[0] for param in serve.params
            if param.param_type_name == "option"}


def settings_markdown() -> str:
    """Every server setting: name, environment variable, type, default and its docstring."""
    from manymodels.serve.settings import ServeSettings

    lines = ["# Server settings", "",
             "Generated from `manymodels.serve.settings.ServeSettings` (pydantic-settings) by "
             "`docs/gen_reference.py`. Precedence: command-line flags, then `MANYMODELS_*` "
             "environment variables, then a spec in `serving/` (`--spec default` reads "
             "`serving/default.yaml`). An unknown field is an error naming it. Nested fields "
             "take `__` in the environment (`MANYMODELS_AUTH__MODE=token`) and a section in a "
             "spec (`auth:` then `mode: token`). *Flag* is the option of `manymodels serve` "
             "that sets the field, where there is one.", ""]
    lines += model_table(ServeSettings, "MANYMODELS_", serve_flags())
    lines.append("")
    return "\n".join(lines)


def specs_markdown() -> str:
    """The fields of the YAML specs in ``segmenters/``, ``trainers/`` and endpoint files."""
    from manymodels.serve.endpoint import EndpointSpec
    from manymodels.specs import CandidateSpec, SegmenterSpec, TrainerSpec

    lines = ["# Spec files", "",
             "Generated from the pydantic models in `manymodels.specs` and "
             "`manymodels.serve.endpoint` by `docs/gen_reference.py`. Every spec forbids "
             "unknown fields; an error names the file and the field. Server specs "
             "(`serving/`) are the [server settings](settings.md).", ""]
    for title, cls in (("Segmenter (`segmenters/*.yaml`)", SegmenterSpec),
                       ("Trainer (`trainers/*.yaml`)", TrainerSpec),
                       ("Candidate (an entry of a trainer's `candidates`)", CandidateSpec),
                       ("Endpoint file (`serve --endpoint FILE`)", EndpointSpec)):
        lines += [f"## {title}", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        lines += model_table(cls)
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- HTTP


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of an application with no deployment (every route present)."""
    from manymodels.serve import ServeSettings, create_app
    from manymodels.serve.endpoint import EndpointSpec

    app = create_app(ServeSettings(), spec=EndpointSpec())
    document: dict[str, Any] = app.openapi()  # type: ignore[attr-defined]
    return document


def http_markdown() -> str:
    """Every route of the OpenAPI document: method, path, scope, summary, statuses."""
    try:
        from manymodels.serve.auth import required_scope
    except ImportError:  # the scope rule moved; the table then shows none
        required_scope = None  # type: ignore[assignment]

    document = openapi_document()
    lines = ["# HTTP API", "",
             "Generated from the OpenAPI document of `manymodels serve` "
             f"(version {document['info']['version']}) by `docs/gen_reference.py`; a running "
             "server shows the same document at `/openapi.json` and renders it at `/docs`. "
             "*Scope* is what a key or token needs when the server requires credentials "
             "(see [Authentication](../guide/auth.md)); `open` routes need none. Errors answer "
             "a JSON problem body (V2 routes: `{\"error\": ...}`), see "
             "[Errors](errors.md).", ""]
    lines += ["| method | path | scope | summary |", "|---|---|---|---|"]
    operations = list(_operations(document))
    for path, method, op in operations:
        scope = required_scope(path) if required_scope else None
        lines.append(f"| {method.upper()} | [`{path}`](#{_route_anchor(method, path)}) | "
                     f"{scope or 'open'} | {_cell(op.get('summary', ''))} |")
    lines.append("")
    for path, method, op in operations:
        lines += [f"## {method.upper()} `{path}` {{#{_route_anchor(method, path)}}}", ""]
        if op.get("summary"):
            lines += [op["summary"] + ".", ""]
        if op.get("description"):
            lines += [inspect.cleandoc(op["description"]), ""]
        params = op.get("parameters", [])
        if params:
            lines += ["| parameter | in | required | description |", "|---|---|---|---|"]
            for param in params:
                lines.append(f"| `{param['name']}` | {param['in']} | "
                             f"{'yes' if param.get('required') else 'no'} | "
                             f"{_cell(param.get('description', ''))} |")
            lines.append("")
        body = op.get("requestBody", {}).get("content", {})
        if body:
            lines += ["Request body: " + ", ".join(f"`{kind}`" for kind in body), ""]
        responses = op.get("responses", {})
        if responses:
            lines += ["| status | meaning |", "|---|---|"]
            for status, response in responses.items():
                lines.append(f"| {status} | {_cell(response.get('description', ''))} |")
            lines.append("")
    return "\n".join(lines)


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            if method in ("get", "post", "put", "delete", "patch"):
                yield path, method, op


def _route_anchor(method: str, path: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in path).strip("-")
    return f"{method}-{slug}".lower()


# -------------------------------------------------------------------------------- errors


def _tree(root: type) -> Iterator[tuple[int, type]]:
    def walk(cls: type, depth: int) -> Iterator[tuple[int, type]]:
        yield depth, cls
        for sub in sorted(cls.__subclasses__(), key=lambda c: c.__name__):
            if sub.__module__.startswith("manymodels"):
                yield from walk(sub, depth + 1)
    yield from walk(root, 0)


def error_classes() -> list[type]:
    """Every class of the exception tree (server-only classes included)."""
    import manymodels.serve  # noqa: F401  (registers the server's own subclasses)
    from manymodels.errors import ManyModelsError

    return [cls for _, cls in _tree(ManyModelsError)]


def errors_markdown() -> str:
    """Each error class with its code, exit code and HTTP status, from the tables in code."""
    from manymodels.cli import exit_code_for
    from manymodels.errors import ManyModelsError
    from manymodels.serve.errors import status_for

    error_classes()
    lines = ["# Errors and exit codes", "",
             "Generated from the exception tree (`manymodels.errors`), the CLI's exit-code "
             "table (`manymodels.cli.EXIT_CODES`) and the server's status table "
             "(`manymodels.serve.errors.HTTP_STATUS`) by `docs/gen_reference.py`.", "",
             "One exception tree: callers catch a few base classes; every class carries a "
             "stable `code`. The CLI prints one line (`error (code): message`) and exits with "
             "the class's exit code; the server answers a JSON problem body with the class's "
             "status and `code`. No bad input produces a traceback. Errors also subclass the "
             "closest built-in (`ValueError`, `KeyError`, ...), so generic `except` blocks "
             "still catch them.", "",
             "| class | code | exit code | HTTP status | when |", "|---|---|---|---|---|"]
    for depth, cls in _tree(ManyModelsError):
        instance = cls.__new__(cls)
        indent = "&nbsp;&nbsp;" * (2 * depth)
        lines.append(f"| {indent}`{cls.__name__}` | `{getattr(cls, 'code', '')}` | "
                     f"{exit_code_for(instance)} | {status_for(instance)} | "
                     f"{_cell(_first_sentence(cls.__doc__))} |")
    lines += ["", "## Exit codes that are outcomes, not errors", "",
              "| command | code | meaning |", "|---|---|---|",
              "| `manymodels monitor` | 10 | a drift or accuracy alarm was raised (the report "
              "is complete) |"]
    lines += [f"| `manymodels retrain` | {code} | {_cell(meaning)} |"
              for code, meaning in retrain_outcomes()]
    lines += [f"| `manymodels jobs wait`, `jobs submit --wait` | {code} | {_cell(meaning)} |"
              for code, meaning in job_outcomes()]
    lines.append("")
    return "\n".join(lines)


def retrain_outcomes() -> list[tuple[int, str]]:
    """The exit codes ``retrain`` documents for its outcomes (its module docstring)."""
    from manymodels.retrain import Outcome

    return [(outcome.exit_code, f"{outcome.label} (`{outcome.name}`)") for outcome in Outcome]


def job_outcomes() -> list[tuple[int, str]]:
    """The exit codes of a command that waited for a batch job, one per outcome."""
    from manymodels.client import JOB_EXIT_CODES

    meanings: dict[int, list[str]] = {}
    for state, code in JOB_EXIT_CODES.items():
        meanings.setdefault(code, []).append(f"`{state}`")
    return [(code, "the job is " + " or ".join(states) + (
        " (still, when `--timeout` ran out)" if code == JOB_EXIT_CODES["running"] else ""))
        for code, states in sorted(meanings.items())]


def _first_sentence(text: str | None) -> str:
    """The first paragraph of a docstring."""
    return inspect.cleandoc(text or "").split("\n\n")[0]


# --------------------------------------------------------------------------- import rules


def import_rules_markdown() -> str:
    """The import-linter contracts of ``pyproject.toml``, as ``make lint`` checks them."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    linter = config.get("tool", {}).get("importlinter", {})
    lines = ["", "## The contracts, as checked", "",
             "Generated from `[tool.importlinter]` in `pyproject.toml` (what `lint-imports` "
             "checks in `make lint`) by `docs/gen_reference.py`.", ""]
    contracts = linter.get("contracts", [])
    if not contracts:
        return "\n".join(lines + ["No import-linter contract is configured yet.", ""])
    for contract in contracts:
        lines += [f"### {contract.get('name', contract.get('id', 'contract'))}", "",
                  f"Type `{contract['type']}`."]
        for key, value in contract.items():
            if key in ("name", "type", "id"):
                continue
            if isinstance(value, list) and key == "layers":
                lines += ["", "Layers, top first (`|` separates modules of one layer that do "
                          "not import one another; parentheses mark an optional one):", ""]
                lines += [f"{i}. `{layer}`" for i, layer in enumerate(value, 1)]
            elif isinstance(value, list):
                lines += ["", f"`{key}`: " + ", ".join(f"`{v}`" for v in value)]
            else:
                lines += ["", f"`{key}`: `{value}`"]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- benchmarks

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_PAGES = ROOT / "docs" / "design" / "benchmarks"


def benchmarks_markdown() -> str:
    """The tables the benchmarks wrote (``benchmarks/_docs.py``), newest first."""
    lines = ["# Benchmark tables", "",
             "Every script in `benchmarks/` writes what it prints to a page here when it "
             "finishes, with the command, date, machine, load average and commit "
             "(`benchmarks/_docs.py`); a rerun replaces its page. The "
             "[performance page](../performance.md) discusses them.", ""]
    rows = []
    for page in sorted(BENCHMARK_PAGES.glob("*.md")):
        if page.name == "index.md":
            continue
        text = page.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip()
        fields = dict(re.findall(r"^\| (command|date|commit) \| (.*) \|$", text, flags=re.M))
        rows.append((fields.get("date", ""), page.name, title, fields.get("command", ""),
                     fields.get("commit", "")))
    if not rows:
        lines.append("No benchmark has written its table yet.")
    else:
        lines += ["| table | date | command | commit |", "|---|---|---|---|"]
        for date, name, title, command, commit in sorted(rows, reverse=True):
            lines.append(f"| [{title}]({name}) | {date} | {command} | {commit} |")
    lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- python


def python_pages() -> dict[str, str]:
    """One mkdocstrings page per public module, and an index linking them."""
    pages = {}
    index = ["# Python API", "",
             "Rendered from the docstrings (NumPy style) by mkdocstrings. Each module's "
             "public API is its `__all__`.", ""]
    for module in PYTHON_MODULES:
        page = f"reference/python/{module}.md"
        pages[page] = f"# `{module}`\n\n::: {module}\n" + "".join(
            f"\n::: {target}\n    options:\n      show_root_heading: true\n"
            for target in lazy_exports(module))
        index.append(f"- [`{module}`]({module.split('/')[-1]}.md)")
    pages["reference/python/index.md"] = "\n".join(index) + "\n"
    return pages


def lazy_exports(module: str) -> list[str]:
    """Where the names a package exports lazily (its ``_LAZY`` table) are defined: static
    analysis cannot follow ``__getattr__``, so their pages name them one by one."""
    table = getattr(importlib.import_module(module), "_LAZY", {})
    return [f"{importlib.util.resolve_name(target, module)}.{name}"
            for name, target in sorted(table.items())]


#: Generated page → function writing it.
PAGES: dict[str, Callable[[], str]] = {
    "reference/cli.md": cli_markdown,
    "reference/settings.md": settings_markdown,
    "reference/specs.md": specs_markdown,
    "reference/http.md": http_markdown,
    "reference/errors.md": errors_markdown,
    "design/benchmarks/index.md": benchmarks_markdown,
}


def main() -> None:
    import mkdocs_gen_files

    for page, build in PAGES.items():
        with mkdocs_gen_files.open(page, "w") as out:
            out.write(build())
        mkdocs_gen_files.set_edit_path(page, "gen_reference.py")
    with mkdocs_gen_files.open("design/architecture.md", "a") as out:
        out.write(import_rules_markdown())
    for page, text in python_pages().items():
        with mkdocs_gen_files.open(page, "w") as out:
            out.write(text)


if __name__ == "<run_path>":  # mkdocs-gen-files runs this file with runpy
    main()
