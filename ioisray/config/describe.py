"""What every config key is: its dotted name, type, default and description, walked from the schema.

One source for `ioisray config describe`, the generated configuration page of the docs, and the
"did you mean" hints of config errors, so none of them can drift from the code.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import textwrap
import types
import typing
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import annotated_types
from pydantic import BaseModel

from ioisray.config.schema import Config, ConfigError

# Stands for any name in a mapping of sections (the searched key of tune.search_space).
PLACEHOLDER = "<key>"


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    key: str  # dotted, e.g. "synthesis.budget"
    type: str  # e.g. "int, >= 0"; "section" for a section
    default: str  # as written in YAML; "" for a section
    description: str
    is_section: bool = False

    @property
    def depth(self) -> int:
        return self.key.count(".")


@dataclasses.dataclass(frozen=True)
class _Field:
    annotation: Any
    default: Any  # dataclasses.MISSING where there is none
    description: str
    constraints: tuple = ()


_MISSING = dataclasses.MISSING


def fields_of(model: Any) -> Optional[dict[str, _Field]]:
    """The fields of a config section (a pydantic model or a dataclass such as SamplerConfig); None for
    anything else."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        out = {}
        for name, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
            out[name] = _Field(f.annotation, default, f.description or "", tuple(f.metadata))
        return out
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model)  # the field types are strings under `from __future__ import annotations`
        out = {}
        for f in dataclasses.fields(model):
            default = f.default_factory() if f.default_factory is not _MISSING else f.default
            out[f.name] = _Field(hints[f.name], default, f.metadata.get("description", ""))
        return out
    return None


def _is_section(annotation: Any) -> bool:
    return fields_of(annotation) is not None


def _mapped_section(annotation: Any) -> Optional[type]:
    """The section type of a `dict[str, Section]` field (tune.search_space), else None."""
    if typing.get_origin(annotation) is dict:
        args = typing.get_args(annotation)
        if len(args) == 2 and _is_section(args[1]):
            return args[1]
    return None


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None was allowed)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return annotation, False


def _human(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def type_name(annotation: Any) -> str:
    """A short reading of a field's type: `int`, `one of: a, b`, `list of int`, `float or null`, `int or a`."""
    inner, optional = _without_none(annotation)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin in (Union, types.UnionType):  # e.g. synthesis.budget: a number or `balance`
        text = " or ".join(", ".join(str(v) for v in typing.get_args(a)) if typing.get_origin(a) is Literal
                           else type_name(a) for a in args)
    elif origin is Literal:
        text = "one of: " + ", ".join(str(a) for a in args)
    elif origin is list:
        text = f"list of {type_name(args[0])}" if args else "list"
    elif origin is tuple:
        text = "[" + ", ".join(type_name(a) for a in args) + "]"
    elif origin is dict:
        text = f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    elif inner is Any:
        text = "any"
    elif _is_section(inner):
        text = _human(inner.__name__)
    elif isinstance(inner, type):
        text = inner.__name__
    else:
        text = str(inner).replace("typing.", "")
    return f"{text} or null" if optional else text


def _constraint_text(constraints: Sequence[Any]) -> list[str]:
    out = []
    for c in constraints:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(c, getattr(annotated_types, attr.capitalize())):
                out.append(f"{op} {getattr(c, attr)}")
    return out


def default_text(value: Any) -> str:
    """A default as one writes it in YAML or a `key=value` override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def iter_keys(model: Any = Config, prefix: str = "") -> Iterator[KeyInfo]:
    """Every key of `model`, depth first in schema order: a section before its keys."""
    for name, f in (fields_of(model) or {}).items():
        key = f"{prefix}{name}"
        if _is_section(f.annotation):
            yield KeyInfo(key, "section", "", f.description, is_section=True)
            yield from iter_keys(f.annotation, key + ".")
            continue
        type_ = ", ".join([type_name(f.annotation), *_constraint_text(f.constraints)])
        yield KeyInfo(key, type_, default_text(f.default), f.description)
        mapped = _mapped_section(f.annotation)
        if mapped is not None:  # each entry of the mapping is a section of its own
            entry = f"{key}.{PLACEHOLDER}"
            yield KeyInfo(entry, "section", "", " ".join((mapped.__doc__ or "").split()), is_section=True)
            yield from iter_keys(mapped, entry + ".")


@functools.cache
def _all_keys() -> tuple[KeyInfo, ...]:
    return tuple(iter_keys())


def all_keys() -> list[KeyInfo]:
    """Every key of Config (sections too), in schema order."""
    return list(_all_keys())


def describe(prefix: Optional[str] = None) -> list[KeyInfo]:
    """The keys at or below `prefix` (a key or a section; None: all). An unknown prefix is a ConfigError
    with the closest keys."""
    keys = all_keys()
    if not prefix:
        return keys
    prefix = prefix.strip().rstrip(".")
    found = [k for k in keys if k.key == prefix or k.key.startswith(prefix + ".")]
    if not found:
        raise ConfigError(f"{prefix!r} is not a config key or section{hint(suggest_keys(prefix))}")
    return found


# --- "did you mean" --------------------------------------------------------------------------------

def _section_at(parts: Sequence[str]) -> Any:
    """The section (model class) that `parts` lead to from Config, or None."""
    model: Any = Config
    i = 0
    while i < len(parts):
        fields = fields_of(model)
        if fields is None or parts[i] not in fields:
            return None
        annotation = fields[parts[i]].annotation
        mapped = _mapped_section(annotation)
        if mapped is not None and i + 1 < len(parts):
            model, i = mapped, i + 2  # the next part is any entry's name
        else:
            model, i = annotation, i + 1
    return model if _is_section(model) else None


def _split(key: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(key.split(".")) if isinstance(key, str) else tuple(str(p) for p in key)


def suggest_keys(key: str | Sequence[str]) -> list[str]:
    """Settings close to an unknown `key` (dotted, or the parts of a validation error's location): a
    sibling of a similar name, the same name in another section, or a similar dotted key."""
    parts = _split(key)
    parent, leaf = parts[:-1], parts[-1]
    section = _section_at(parent)
    siblings = list(fields_of(section) or {}) if section is not None else []

    def sibling(cutoff: float) -> list[str]:
        return [".".join((*parent, m)) for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=cutoff)]

    known = [k.key for k in all_keys() if PLACEHOLDER not in k.key]
    near = difflib.get_close_matches(".".join(parts), known, n=2, cutoff=0.6)
    same_name = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != ".".join(parts)][:3]
    if section is None:  # a misspelt section (`traim.epochs`), or a key without its section (`budget`)
        return near or same_name
    # A close typo of a sibling first (`synthesis.budjet`), then the name in another section
    # (`train.budget`), then a looser likeness.
    return sibling(0.75) or same_name or sibling(0.6) or near


def allowed_values(key: str | Sequence[str]) -> Optional[list[Any]]:
    """The values a Literal setting takes (None if `key` is not one)."""
    parts = _split(key)
    section = _section_at(parts[:-1])
    field = (fields_of(section) or {}).get(parts[-1]) if section is not None else None
    if field is None:
        return None
    inner, _ = _without_none(field.annotation)
    return list(typing.get_args(inner)) if typing.get_origin(inner) is Literal else None


def suggest_values(key: str | Sequence[str], value: Any) -> list[str]:
    """Allowed values of a Literal setting close to a wrong `value`."""
    allowed = [str(v) for v in allowed_values(key) or []]
    if not allowed or not isinstance(value, str) or not value:
        return []
    lower = {a.lower(): a for a in allowed}
    if value.lower() in lower:  # only the case differs
        return [lower[value.lower()]]
    starts = [a for a in allowed if a.lower().startswith(value.lower())]
    if len(starts) == 1:
        return starts
    return [lower[m] for m in difflib.get_close_matches(value.lower(), list(lower), n=2, cutoff=0.6)]


def hint(suggestions: Sequence[str]) -> str:
    """' (did you mean a or b?)', or '' when there is nothing to suggest."""
    return f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""


# --- output ----------------------------------------------------------------------------------------

def format_text(keys: Sequence[KeyInfo], width: int = 100) -> str:
    """`ioisray config describe`: each key with its type and default, its description below it."""
    lines = []
    for k in keys:
        if k.is_section and lines:
            lines.append("")
        head = f"{k.key}  ({'section' if k.is_section else f'{k.type}; default {k.default}'})"
        lines.append(head)
        lines += textwrap.wrap(k.description, width=width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Markdown table-cell text: HTML-like `<run>` shown as written (outside code spans), pipes escaped."""
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):
        pieces[i] = pieces[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(pieces).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`".replace("|", "\\|") if text else ""


def markdown_reference(level: int = 2) -> str:
    """The configuration page's reference: a table of the top-level keys, then one heading and table
    per section (sub-sections under their own headings, one level down); `level`: the sections'."""
    keys = all_keys()
    blocks: list[tuple[Optional[KeyInfo], list[KeyInfo]]] = [(None, [])]
    for k in keys:
        if k.is_section:
            blocks.append((k, []))
        else:
            owner = max((b for b in blocks if b[0] is None or k.key.startswith(b[0].key + ".")),
                        key=lambda b: len(b[0].key) if b[0] else -1)
            owner[1].append(k)
    out = []
    for section, rows in blocks:
        if section is None:
            out += [f"{'#' * level} Top-level keys", ""]
        else:
            out += [f"{'#' * (level + section.depth)} {_md(section.key)}", "", _md(section.description), ""]
        if rows:
            out += ["| key | type | default | description |", "|---|---|---|---|"]
            out += [f"| `{r.key}` | {_md(r.type)} | {_code(r.default)} | {_md(r.description)} |" for r in rows]
            out.append("")
    return "\n".join(out)
