"""docs/recipes.md, generated from the recipe's pydantic models: every section, every field, its
type, default, range and help text, so the reference cannot drift from the code
(tests/test_docs.py fails when the committed page differs from what this prints).

    python -m edgedistill.recipe_reference > docs/recipes.md
"""

from __future__ import annotations

import json
import typing
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from edgedistill.recipe import BUNDLED_RECIPES, Recipe

INTRO = """# Recipe reference

A recipe is a TOML file with one table per stage. Every field below can be set in the file or on
the command line (`--set section.field=value`, the value parsed as TOML); an unknown field or a
value out of range is refused in one line naming the file (or the flag) and the field, before
any stage runs. `edgedistill recipe NAME` prints a bundled recipe with every field resolved
(`--commented` for the file as shipped); bundled recipes: {bundled}.

This page is generated from the code (`python -m edgedistill.recipe_reference > docs/recipes.md`);
a test fails when it is out of date.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple):
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return f"list of [{args[0].__name__}](#{args[0].__name__.lower()})"
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" or unset" if type(None) in args else "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _range(info: FieldInfo) -> str:
    words = []
    for item in info.metadata:
        for kind, text in ((Ge, "≥"), (Gt, ">"), (Le, "≤"), (Lt, "<")):
            if isinstance(item, kind):
                bound = getattr(item, {Ge: "ge", Gt: "gt", Le: "le", Lt: "lt"}[kind])
                words.append(f"{text} {bound}")
        if isinstance(item, MinLen):
            words.append(f"at least {item.min_length} item(s)")
        if isinstance(item, MaxLen):
            words.append(f"at most {item.max_length} item(s)")
    return ", ".join(words)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "—"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _entry_models(model: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """The models of a section's list-of-tables fields ([[generate.tasks]], ...), as (field, model)."""
    found = []
    for name, info in model.model_fields.items():
        args = typing.get_args(info.annotation)
        if typing.get_origin(info.annotation) is list and args and isinstance(args[0], type) \
                and issubclass(args[0], BaseModel):
            found.append((name, args[0]))
    return found


def _section(title: str, model: type[BaseModel], intro: str = "") -> str:
    # Plain headings only: GitHub derives the anchor from the text (`[run]` -> #run, TaskCfg ->
    # #taskcfg); it does not honour {#id}, and the type column links to these anchors.
    lines = [f"## {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| field | type | default | range | what it does |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        help_text = " ".join((info.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {_range(info)} | {help_text} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    parts = [INTRO.format(bundled=", ".join(f"`{name}`" for name in BUNDLED_RECIPES))]
    entries = []
    for name, info in Recipe.model_fields.items():
        parts.append(_section(f"`[{name}]`", info.annotation))
        entries += [(f"{name}.{field}", model) for field, model in _entry_models(info.annotation)]
    for table, model in entries:
        doc = " ".join((model.__doc__ or "").split())
        parts.append(_section(model.__name__, model, f"One `[[{table}]]` entry. {doc}".strip()))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
