"""core/options.py and its two users: `layerfuse train --fuser-opt KEY=VALUE`, `layerfuse ablate --fuser-opt FUSER.KEY=VALUE`."""

from __future__ import annotations

import click
import pytest

from layerfuse.core.options import option_pair, option_value
from layerfuse.pipeline.ablation.sweep import SweepError, fuser_option
from layerfuse.pipeline.cli import _fuser_options


@pytest.mark.parametrize("text, value", [
    ("4", 4), ("-0.5", -0.5), ("1e-3", 1e-3), ("true", True), ("false", False), ("null", None), ("[1, 2]", [1, 2]),
    ('{"a": 1}', {"a": 1}), ('"4"', "4"), ("mean", "mean"), (" allocator ", "allocator"), ("3-18-23", "3-18-23"),
    ("", ""), ("[1, 2", "[1, 2"),
])
def test_a_value_is_json_where_it_parses_else_the_text(text, value):
    assert option_value(text) == value and type(option_value(text)) is type(value)


def test_a_pair_splits_at_the_first_equals_and_reads_dashes_as_underscores():
    assert option_pair("heads=4") == ("heads", 4)
    assert option_pair(" num-levels = 3 ") == ("num_levels", 3)
    assert option_pair("expr=a=b") == ("expr", "a=b")
    assert option_pair("layers=") == ("layers", "")


@pytest.mark.parametrize("text", ["heads", "=4", "  =x", ""])
def test_a_pair_without_key_or_equals_is_an_error_naming_it(text):
    with pytest.raises(ValueError, match="expected KEY=VALUE, got " + repr(text).replace("[", r"\[")):
        option_pair(text)


def test_train_fuser_opts_use_the_same_reading():
    assert _fuser_options(("heads=4", "mode=allocator", "use-text=true")) == {"heads": 4, "mode": "allocator", "use_text": True}
    with pytest.raises(click.BadParameter, match="expected KEY=VALUE, got 'heads'"):
        _fuser_options(("heads",))


def test_ablate_fuser_opts_use_the_same_reading():
    assert fuser_option("igva.allocator_dim=256") == ("igva", "allocator_dim", 256)
    assert fuser_option(" mmfuser . num-points = [2, 4]") == ("mmfuser", "num_points", [2, 4])
    assert fuser_option("igva.mode=allocator") == ("igva", "mode", "allocator")
    for bad in ("igva.allocator_dim", "allocator_dim=256", ".dim=1", "igva.=1"):
        with pytest.raises(SweepError, match="expected FUSER.KEY=VALUE"):
            fuser_option(bad)
