"""Typed option tables: one validator for the engine's own sections and every plugin's options.

A schema is a dataclass. Each field's type says what TOML value it takes; `field(metadata=...)`
adds limits (`min`, `max`, `gt`, `lt`; `run_file=True`: a file name inside the run folder) and the one-line
`help` shown in docs/recipe-keys.md and by
`python -m engine plugins`. Validation never stops at the first problem: it returns every one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import PurePath
from typing import Any, Literal, Union, get_args, get_origin


def opt(default: Any = dataclasses.MISSING, help: str = "", **limits: Any) -> Any:
    """A dataclass field with a help line and optional limits (min, max, gt, lt)."""
    meta = {"help": help, **limits}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: typing.cast(Any, type(value))(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of two neighbouring letters (optimal string alignment)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def closest(word: str, choices: typing.Iterable[str]) -> str | None:
    """The choice a typo most likely meant: the fewest edits (a swap of two letters counts as one,
    so `cvs` is `csv`, not `curves`), at most a third of the word; otherwise difflib's closest match."""
    choices = list(dict.fromkeys(choices))
    if not choices:
        return None
    distances = {c: edit_distance(word.lower(), c.lower()) for c in choices}
    best = min(distances.values())
    if best <= max(1, len(word) // 3):
        tied = [c for c in choices if distances[c] == best]
        return (difflib.get_close_matches(word, tied, n=1, cutoff=0.0) or tied)[0]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    match = closest(word, choices)
    return f" (did you mean {prefix}{match}?)" if match else ""


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is dict or origin is dict:
        return "a table"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"a list of {describe_type(inner).removeprefix('an ').removeprefix('a ')}s" if inner is not Any else "a list"
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(describe_type(a) for a in args)
        return f"{text} (optional)" if len(args) < len(get_args(tp)) else text
    return getattr(tp, "__name__", str(tp))


def allows_none(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def schema_problems(schema: type) -> list[str]:
    """Mistakes in an Options dataclass itself (not in a recipe): a default of None its type does not
    allow, a type the validator cannot check. Returns one line per problem."""
    problems = []
    try:
        hints = resolved_hints(schema)
    except Exception as exc:  # an annotation naming something undefined
        return [f"its Options' type annotations cannot be read ({type(exc).__name__}: {exc})"]
    for f in fields_of(schema):
        tp = hints[f.name]
        if f.default is None and tp is not Any and not allows_none(tp):
            problems.append(
                f"option '{f.name}' defaults to None but its type {describe_type(tp)} does not allow it; "
                f"declare it `{f.name}: {getattr(tp, '__name__', tp)} | None = opt(None, ...)`"
            )
        try:
            _check_value(f.default if f.default is not dataclasses.MISSING else 0, tp)
        except TypeError:
            problems.append(f"option '{f.name}': unsupported type {tp!r}; use bool, int, float, str, list[...], dict, Literal[...] or X | None")
    return problems


def _check_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, converted value) for a TOML value against a type annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    if origin is Literal:
        return value in get_args(tp), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (inner,) = get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, conv = _check_value(item, inner)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is type(None):
                continue
            ok, conv = _check_value(value, arg)
            if ok:
                return True, conv
        return False, value
    raise TypeError(f"unsupported option type {tp!r}")


def _check_limits(value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    if isinstance(value, str) and meta.get("run_file") and not _plain_relative(value):
        return f"must be a file name inside the run folder (no '..', not absolute), got {value!r}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if "min" in meta and value < meta["min"]:
        return f"must be at least {meta['min']}, got {value}"
    if "max" in meta and value > meta["max"]:
        return f"must be at most {meta['max']}, got {value}"
    if "gt" in meta and not value > meta["gt"]:
        return f"must be greater than {meta['gt']}, got {value}"
    if "lt" in meta and not value < meta["lt"]:
        return f"must be less than {meta['lt']}, got {value}"
    return None


def _plain_relative(name: str) -> bool:
    path = PurePath(name)
    return bool(name) and not path.is_absolute() and not name.startswith(("/", "\\")) and ".." not in path.parts and str(path) != "."


def fields_of(schema: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(schema))


def resolved_hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def validate(table: Any, schema: type, key_prefix: str, origin: str) -> tuple[Any, list[str]]:
    """Validate one TOML table against a dataclass schema.

    Returns (instance or None, errors). Each error reads "ORIGIN: dotted.key: problem".
    """
    errors: list[str] = []
    if not isinstance(table, dict):
        return None, [f"{origin}: {key_prefix.rstrip('.')}: expected a table, got {table!r}"]
    hints = resolved_hints(schema)
    names = [f.name for f in fields_of(schema)]
    for key in table:
        if key not in names:
            errors.append(f"{origin}: {key_prefix}{key}: unknown key{did_you_mean(key, names, key_prefix)}")
    values: dict[str, Any] = {}
    for f in fields_of(schema):
        dotted = f"{key_prefix}{f.name}"
        if f.name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{origin}: {dotted}: required option is missing ({f.metadata.get('help', '')})".replace(" ()", ""))
            continue
        ok, value = _check_value(table[f.name], hints[f.name])
        if not ok:
            errors.append(f"{origin}: {dotted}: expected {describe_type(hints[f.name])}, got {table[f.name]!r}")
            continue
        problem = _check_limits(value, f.metadata)
        if problem:
            errors.append(f"{origin}: {dotted}: {problem}")
            continue
        values[f.name] = value
    if errors:
        return None, errors
    return schema(**values), []


def defaults_table(schema: type) -> dict[str, Any]:
    """The schema's defaults as a plain dict (fields without a default are left out)."""
    out: dict[str, Any] = {}
    for f in fields_of(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def option_rows(schema: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for documentation."""
    hints = resolved_hints(schema)
    rows = []
    for f in fields_of(schema):
        if f.default is None:
            default = "(not set)"
        elif f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        limits = ", ".join(f"{k} {f.metadata[k]}" for k in ("min", "gt", "max", "lt") if k in f.metadata)
        help_text = f.metadata.get("help", "") + (f" [{limits}]" if limits else "")
        rows.append((f.name, describe_type(hints[f.name]), default.replace("'", '"'), help_text))
    return rows
