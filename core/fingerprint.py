"""Config fingerprints: one rule for which settings enter them, one hash.

A fingerprint names what a cache, a run, a sweep or a variant computes; a folder written under one fingerprint is
resumed only by the same fingerprint. Which fields of a config dataclass enter it is declared on the field:

    workers: int = runtime(default=2)                       # never: how it runs, not what it computes
    lm: LMSettings = fingerprinted_when(lambda s: s.mode == "lm", default_factory=LMSettings)
    seed: int = 0                                           # every other field: always

`fingerprint` is sha256 over canonical JSON (sorted keys, `str` for what JSON lacks), first 16 hex digits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, Field, asdict, field, fields, is_dataclass
from typing import Any, Callable

FINGERPRINT = "fingerprint"  # field metadata key: False (never) or a predicate config -> bool (when it holds)


def runtime(*, default: Any = MISSING, default_factory: Any = MISSING, metadata: dict[str, Any] | None = None) -> Any:
    """A field that changes how a config runs (workers, device, progress, output place), not what it computes."""
    return field(default=default, default_factory=default_factory, metadata={**(metadata or {}), FINGERPRINT: False})


def fingerprinted_when(predicate: Callable[[Any], bool], *, default: Any = MISSING, default_factory: Any = MISSING,
                       metadata: dict[str, Any] | None = None) -> Any:
    """A field that enters the fingerprint only when `predicate(config)` holds (e.g. the settings of one mode)."""
    return field(default=default, default_factory=default_factory, metadata={**(metadata or {}), FINGERPRINT: predicate})


def enters_fingerprint(f: Field, config: Any) -> bool:
    """Whether field `f` of `config` enters the config's fingerprint."""
    rule = f.metadata.get(FINGERPRINT, True)
    return rule(config) if callable(rule) else bool(rule)


def fingerprinted(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass that enter its fingerprint, in field order, as `asdict` gives them
    (a nested config dataclass by the same rule)."""
    d = asdict(config)
    out: dict[str, Any] = {}
    for f in fields(config):
        if enters_fingerprint(f, config):
            value = getattr(config, f.name)
            out[f.name] = fingerprinted(value) if is_dataclass(value) and not isinstance(value, type) else d[f.name]
    return out


def fingerprint(settings: Any) -> str:
    """16 hex digits of sha256 over the canonical JSON of `settings`: a config dataclass (its fingerprinted fields)
    or a plain JSON-like record."""
    if is_dataclass(settings) and not isinstance(settings, type):
        settings = fingerprinted(settings)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_diff(saved: dict[str, Any], config: Any) -> list[str]:
    """The fingerprinted fields of `config` whose values differ from `saved` (a record of an earlier config, as JSON
    read it back), sorted: what to name when a folder of other settings is refused."""
    now = json.loads(json.dumps(fingerprinted(config), default=str))
    return sorted(k for k, v in now.items() if saved.get(k) != v)
