"""Config dataclasses: their closed choices and how a mapping from outside becomes one.

A closed choice (a mode, a template, a precision) is a `Literal[...]` annotation on the config field; `choices`
lists its values (the CLI turns them into click choices), `check_choice` / `check_choices` are the one check.
`read_config` turns a mapping (a sweep file, a run's saved config.json, a record of sweep.json) into a config
dataclass with pydantic: types, choices and keys are checked, an unknown key is an error, and the message names the
source, the key and the reason. A dataclass read this way forbids unknown keys with `@with_config(STRICT)` (its
nested config dataclasses too); pydantic's `BeforeValidator`s on its fields accept the shorthands a file allows.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from layerfuse.core.errors import ConfigError

STRICT = ConfigDict(extra="forbid")  # `@with_config(STRICT)`: an unknown key is an error, not dropped
T = TypeVar("T")


def choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a `Literal[...]` annotation (also inside `X | None` or `Optional[X]`); None for any other."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [c for a in typing.get_args(annotation) if (c := choices(a)) is not None]
        return tuple(v for c in found for v in c) if found else None
    return None


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (string annotations evaluated in its module)."""
    return typing.get_type_hints(cls)


def check_choice(value: Any, allowed: Any, what: str, error: type[Exception] = ConfigError) -> Any:
    """`value` when it is one of `allowed` (a Literal type or a sequence), else `error` naming `what`."""
    values = choices(allowed) if choices(allowed) is not None else tuple(allowed)
    if value not in values:
        raise error(f"{what} must be one of {', '.join(map(str, values))}, not {value!r}")
    return value


def check_choices(config: Any, *, name: Callable[[str], str] = lambda path: path, error: type[Exception] = ConfigError) -> Any:
    """Check every Literal-annotated field of a config dataclass, nested config dataclasses included (None passes
    where the annotation allows it). `name` turns a dotted field path into what the message names (an option)."""
    _check_choices(config, "", name, error)
    return config


def _check_choices(config: Any, prefix: str, name: Callable[[str], str], error: type[Exception]) -> None:
    hints = field_types(type(config))
    for f in dataclasses.fields(config):
        value, path = getattr(config, f.name), prefix + f.name
        allowed = choices(hints[f.name])
        if allowed is not None and not (value is None and _allows_none(hints[f.name])):
            check_choice(value, allowed, name(path), error)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_choices(value, path + ".", name, error)


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def read_config(cls: type[T], data: Any, *, where: str, context: dict[str, Any] | None = None,
                error: type[Exception] = ConfigError) -> T:
    """`data` (a mapping) as a `cls` config dataclass, validated by pydantic; `error` names `where`, each wrong key
    and why (an unknown key with the keys allowed there)."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return TypeAdapter(cls).validate_python(data, context=context)
    except ValidationError as e:
        raise error(f"{where}: " + "; ".join(_problem(cls, p) for p in e.errors())) from None


def _problem(cls: type, problem: Any) -> str:
    loc = [str(part) for part in problem["loc"]]
    key = ".".join(loc) or "(top level)"
    if problem["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = _keys_at(cls, loc[:-1])
        return f"unknown key '{key}'" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if problem["type"] == "missing":
        return f"'{key}' is missing"
    reason = problem["msg"].removeprefix("Value error, ")
    return f"{key}: {reason} (got {problem['input']!r})"


def _keys_at(cls: Any, loc: list[str]) -> list[str]:
    """The field names of the config dataclass at `loc` inside `cls` ([] when there is none)."""
    for part in loc:
        hints = field_types(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(part)
        args = [a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)]  # `Settings | None`, Annotated[...]
        if args:
            cls = args[0]
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
