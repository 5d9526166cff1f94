"""One registry of fusers: build any of them by name from a config dataclass (open_clip style)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Fuser, FuserBuildError, FuserConfig, LLMSpec, VisionSpec
from .layers import LayerSpecError

_FUSERS: dict[str, type[Fuser]] = {}


def register_fuser(cls: type[Fuser]) -> type[Fuser]:
    """Class decorator: make `cls` buildable as `cls.name`."""
    if not cls.name or cls.name in _FUSERS:
        raise ValueError(f"fuser name {cls.name!r} is empty or already registered")
    _FUSERS[cls.name] = cls
    return cls


def list_fusers() -> list[str]:
    return list(_FUSERS)


def fuser_class(name: str) -> type[Fuser]:
    try:
        return _FUSERS[name]
    except KeyError:
        raise FuserBuildError(f"unknown fuser {name!r}; available: {', '.join(_FUSERS)}") from None


def fuser_config(name: str, **options: Any) -> FuserConfig:
    """The config dataclass of fuser `name` with `options` set; unknown options are an error."""
    cls = fuser_class(name).config_class
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FuserBuildError(f"fuser {name!r} has no option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known))}")
    return cls(**{k: v for k, v in options.items() if v is not None})


def build_fuser(name: str, vision: VisionSpec, llm: LLMSpec, config: FuserConfig | None = None, **options: Any) -> Fuser:
    """Build fuser `name` for these encoder features and this LLM.

    `config` (the fuser's own dataclass) or keyword `options` (fields of that dataclass), not both.
    Bad combinations (e.g. `single` with a multi-layer spec) raise FuserBuildError with the reason.
    """
    cls = fuser_class(name)
    if config is None:
        config = fuser_config(name, **options)
    elif options:
        raise FuserBuildError("pass either a config or keyword options, not both")
    elif not isinstance(config, cls.config_class):
        raise FuserBuildError(f"fuser {name!r} takes a {cls.config_class.__name__}, got {type(config).__name__}")
    try:
        return cls(config, vision, llm)
    except LayerSpecError as e:
        raise FuserBuildError(f"{name}: {e}") from e
