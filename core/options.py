"""Option values given as text (`--fuser-opt heads=4`, `--fuser-opt igva.allocator_dim=256`): one parser.

A value is JSON when it parses (numbers, true/false/null, lists, objects, quoted strings), else the text itself;
keys are option names with `-` read as `_` (so `num-levels` and `num_levels` are the same option).
"""

from __future__ import annotations

import json
from typing import Any

from layerfuse.core.errors import ConfigError


def option_value(text: str) -> Any:
    """`4` -> 4, `true` -> True, `[1, 2]` -> [1, 2], `"x"` -> "x", `mean` -> "mean" (surrounding spaces dropped)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def option_pair(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (KEY with `-` as `_`, option_value(VALUE)); only the first `=` splits, so values may hold `=`.

    Raises ConfigError (a ValueError) naming the text when there is no `=` or no key."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    return key, option_value(value)
