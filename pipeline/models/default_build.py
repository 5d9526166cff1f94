"""Building a seeded default model: the one way the embedded vision tower (default_vision.py) and the embedded LLM
(llm.py) are made, saved and reused.

    build_default(out, settings, fill, seed=...)
      1. reuse: `out` holding a default built with the same `settings` is kept as it is; one built with other
         settings, or a folder without a marker (incomplete, or not a default at all), is refused, never overwritten
      2. every generator seeded from `seed` (the caller's streams are restored afterwards)
      3. `fill(staging)` builds the model from its config and `save_pretrained`s it into a fresh staging folder
      4. the settings marker (`MARKER`: a note, the settings, what `fill` reports) is written next to it
      5. the staging folder is renamed into place (core/atomic.py)

A killed build leaves at most a hidden staging folder, never a half-written default, and concurrent builders
(several ranks) all end up with one folder.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from layerfuse.core.atomic import fresh_temp_dir, publish_dir
from layerfuse.core.errors import StateError
from layerfuse.core.resume_state import capture_rng, restore_rng

MARKER = "layerfuse_default.json"  # the settings a default folder was built with (and what its build reported)


def settings_of(cfg: Any) -> dict[str, Any]:
    """A config dataclass as the marker stores it (JSON types: tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a default folder, or None when it has none."""
    path = Path(folder) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def reusable(out: Path, settings: Mapping[str, Any], what: str, error: type[StateError]) -> bool:
    """True when `out` holds a default built with `settings`, False when nothing is there (no folder, or an empty
    one); raises `error` when `out` holds anything else (a default of other settings, or not a complete default)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    found = read_marker(out)
    if found is None:
        raise error(f"'{out}' exists but is not a complete {what} (no {MARKER}); remove it or choose another folder")
    diff = sorted(k for k, v in settings.items() if found.get(k) != v)
    if diff:
        raise error(f"'{out}' holds a {what} built with other settings (differs in: {', '.join(diff)}); "
                    f"delete it or choose another folder")
    return True


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: torch (CPU and CUDA), Python's and NumPy's global generators seeded from `seed`. After: all of them
    back where they were, so building a default never shifts the caller's random streams."""
    tensors, plain = capture_rng()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        restore_rng(tensors, plain)


def build_default(out_dir: str | Path, settings: Mapping[str, Any], fill: Callable[[Path], Mapping[str, Any]], *,
                  seed: int, note: Mapping[str, Any], what: str, error: type[StateError],
                  check: Callable[[Path], None] | None = None) -> Path:
    """Build a default model in `out_dir` once (see the module docstring).

    `fill(staging)` runs with every generator seeded from `seed`, writes the model's files into `staging` and
    returns extra marker fields; the marker is `{**note, **settings, **extra}` (indent 1). `check(staging)`, when
    given, sees the complete folder before it is published and raises to refuse it. `what` names the model in
    errors ("default vision tower"), `error` is the class they are raised as."""
    out = Path(out_dir)
    settings = dict(settings)
    if reusable(out, settings, what, error):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = fresh_temp_dir(out)
    try:
        with seeded(seed):
            extra = fill(staging)
        (staging / MARKER).write_text(json.dumps({**note, **settings, **extra}, indent=1))
        if check is not None:
            check(staging)
        try:
            publish_dir(staging, out)
        except OSError:
            if not reusable(out, settings, what, error):  # it vanished again: not a concurrent builder's
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
