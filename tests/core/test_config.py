"""core/config.py: closed choices as Literal annotations (one check), mappings read into config dataclasses by
pydantic with unknown keys as errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest
from pydantic import BeforeValidator, with_config

from layerfuse.core.config import STRICT, check_choice, check_choices, choices, read_config
from layerfuse.core.errors import ConfigError

Mode = Literal["fast", "exact"]


@with_config(STRICT)
@dataclass
class Inner:
    width: int = 8
    mode: Mode | None = None


@with_config(STRICT)
@dataclass
class Outer:
    name: str
    mode: Mode = "fast"
    tags: Annotated[list[str], BeforeValidator(lambda v: v.split(",") if isinstance(v, str) else v)] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_choices_are_the_literal_values_also_when_optional():
    assert choices(Mode) == ("fast", "exact") and choices(Mode | None) == ("fast", "exact") and choices(Literal[1, 2]) == (1, 2)
    assert choices(str) is None and choices(int | None) is None


def test_one_check_names_the_field_the_value_and_the_choices():
    assert check_choice("fast", Mode, "mode") == "fast" and check_choice(2, (1, 2), "stage") == 2
    with pytest.raises(ConfigError, match="mode must be one of fast, exact, not 'slow'"):
        check_choice("slow", Mode, "mode")
    check_choices(Outer("x", inner=Inner(mode=None)))  # None passes where the annotation allows it
    with pytest.raises(ConfigError, match="--inner-mode must be one of fast, exact, not 'slow'"):
        check_choices(Outer("x", inner=Inner(mode="slow")), name=lambda path: "--" + path.replace(".", "-"))
    with pytest.raises(KeyError, match="mode must be one of"):
        check_choices(Outer("x", mode="slow"), error=KeyError)


def test_read_config_converts_and_validates():
    got = read_config(Outer, {"name": "a", "tags": "x,y", "inner": {"width": "4"}}, where="job.yaml")
    assert got == Outer("a", tags=["x", "y"], inner=Inner(width=4))


@pytest.mark.parametrize("data, message", [
    ({"name": "a", "bogus": 1}, "job.yaml: unknown key 'bogus' (allowed: name, mode, tags, inner)"),
    ({"name": "a", "inner": {"widht": 3}}, "job.yaml: unknown key 'inner.widht' (allowed: width, mode)"),
    ({"mode": "fast"}, "job.yaml: 'name' is missing"),
    ({"name": "a", "mode": "slow"}, "job.yaml: mode: Input should be 'fast' or 'exact' (got 'slow')"),
    ({"name": "a", "inner": {"width": 2.5}}, "job.yaml: inner.width: Input should be a valid integer, got a number with a fractional part (got 2.5)"),
    (["name"], "job.yaml: expected a mapping of settings, got list"),
])
def test_read_config_errors_name_the_source_the_key_and_the_reason(data, message):
    with pytest.raises(ConfigError) as e:
        read_config(Outer, data, where="job.yaml")
    assert str(e.value) == message
