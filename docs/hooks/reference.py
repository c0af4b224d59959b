"""MkDocs hook: the CLI/config reference, generated at build time from the code itself.

`docs/reference.md` holds the marker below; this hook replaces it with one table per command of
`distill.cli.COMMANDS` (flags and YAML keys from the command's pydantic config model, or, for a
command without one, from its argparse parser) and one table per section of
`distill.config.RunConfig` (the keys of a `distill run` YAML file). Nothing is listed by hand, so
a field added, renamed or re-documented in the code shows up here on the next build.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = "<!-- cli-reference -->"
PAGE = "reference.md"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its `{MARKER}` marker: the generated reference has nowhere to go")
    return markdown.replace(MARKER, reference())


def reference() -> str:
    from distill.cli import COMMANDS, build_parser
    from distill.config import RunConfig

    subparsers = _subparsers(build_parser())
    parts = []
    for name, entry in COMMANDS.items():  # (function, config model or None, one-line help)
        model, help_text, parser = entry[1], entry[2], subparsers[name]
        parts.append(f"## `distill {name}`\n\n{_one_paragraph(parser.description or help_text)}\n")
        if name == "run":
            parts.append(_parser_table(parser))
            parts.append(_run_sections(RunConfig))
        elif model is None:
            parts.append(_parser_table(parser))
        else:
            parts.append(_model_table(model, parser))
            parts.append(_common_options(parser, model))
    return "\n".join(parts)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise ValueError("distill's parser has no subcommands")


# -- pydantic config models -------------------------------------------------------------------

def _model_table(model: type[BaseModel], parser: argparse.ArgumentParser) -> str:
    flags: dict[str, list[str]] = {}
    for action in parser._actions:
        flags.setdefault(action.dest, []).extend(action.option_strings)
    rows = ["| flag | YAML key | type | default | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        flag = " ".join(f"`{f}`" for f in flags.get(name, [])) or "(YAML only)"
        rows.append(f"| {flag} | `{name}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} "
                    f"| {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def _run_sections(run_config: type[BaseModel]) -> str:
    """One table per section of the run YAML; nested models become `section.key` rows."""
    parts = ["### The run config file\n\nEvery key of a `distill run` YAML file, by section "
             "(`--set SECTION.KEY=VALUE` overrides one).\n"]
    top = {n: f for n, f in run_config.model_fields.items() if not _submodel(f.annotation)}
    if top:
        parts.append("#### top level\n\n" + _key_table(top, ""))
    for name, field in run_config.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is None:
            continue
        doc = _one_paragraph(sub.__doc__ or field.description or "")
        parts.append(f"#### `{name}`" + ("" if field.is_required() else " (optional)") + f"\n\n{doc}\n\n"
                     + _key_table(sub.model_fields, name + ("[]." if _is_list(field.annotation) else ".")))
    return "\n".join(parts)


def _key_table(fields: dict[str, FieldInfo], prefix: str) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:  # a nested section: its keys in the same table
            nested = f"{prefix}{name}[]." if _is_list(field.annotation) else f"{prefix}{name}."
            rows.extend(_key_table(sub.model_fields, nested).splitlines()[2:])
            continue
        rows.append(f"| `{prefix}{name}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} "
                    f"| {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field: `Section`, `Section | None` (an optional section) or
    `list[Section] | None` (a list of them, e.g. `teachers`)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _submodel(args[0])
    if typing.get_origin(annotation) is list and len(args) == 1:
        return _submodel(args[0])
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _is_list(annotation: Any) -> bool:
    """A list of sections (`teachers`): its keys are written `teachers[].name`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is list


def _type(annotation: Any) -> str:
    """A type as a user writes it: `int | None`, `forward_kl | reverse_kl`, `list[path]`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (list, dict, tuple, set):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if annotation is typing.Any:
        return "any"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    return _value(value)


def _value(value: Any) -> str:
    """A default as it is written in YAML (`true`, `[1, 8, 32]`, `auto`); None reads "unset"."""
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value, default=str) if not isinstance(value, (str, Path)) else value}`"


def _common_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> str:
    """Options of the command that are not config fields (`--config`, `--debug`, `--verbose`)."""
    extra = [a for a in parser._actions if a.option_strings and a.dest not in model.model_fields
             and not isinstance(a, argparse._HelpAction)]
    if not extra:
        return ""
    return "Also: " + "; ".join(f"`{', '.join(a.option_strings)}`: {(a.help or '').rstrip('.')}" for a in extra) + ".\n"


# -- argparse parsers (commands without a config model) ---------------------------------------

def _parser_table(parser: argparse.ArgumentParser) -> str:
    rows = ["| argument | type | default | description |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = " ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest.upper()}` (positional)"
        rows.append(f"| {name} | {_cell(_action_type(action))} | {_cell(_action_default(action))} "
                    f"| {_cell(action.help or '')} |")
    return "\n".join(rows) + "\n"


def _action_type(action: argparse.Action) -> str:
    if action.choices:
        return " | ".join(str(c) for c in action.choices)
    if action.nargs == 0:
        return "flag"
    kind = "path" if action.type is Path else getattr(action.type, "__name__", "str")
    return f"{kind} (repeatable)" if isinstance(action, argparse._AppendAction) else kind


def _action_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    return _value(action.default)


def _one_paragraph(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    """Table-safe: one line, pipes escaped (also inside backticks, which Python-Markdown honours)."""
    return _one_paragraph(text).replace("|", "\\|")
