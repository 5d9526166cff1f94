"""Layer specs (docs/methods.md#layer-indexing-and-presets): presets, scaling to other depths, explicit lists and
groups, errors."""

from __future__ import annotations

import pytest
from layerfuse.fusion.layers import (
    LayerSpecError,
    llm_layer_for,
    parse_layers,
    scale_index,
)


@pytest.mark.parametrize(
    "spec, terms",
    [
        ("18", [[18], [23]]),
        ("3-18", [[3], [18], [23]]),
        ("3-18-23", [[3], [18], [23]]),
        ("former", [list(range(1, 13)), [23]]),
        ("latter", [list(range(13, 25)), [23]]),
        ("all", [list(range(1, 13)), list(range(13, 25)), [23]]),
        ("mmfuser", [[3], [8], [13], [18], [23]]),
        ("igva", [list(range(1, 7)), list(range(7, 13)), list(range(13, 19)), list(range(19, 25)), [23]]),
        ("penultimate", [[23]]),
        ("last", [[24]]),
        ("23", [[23]]),
    ],
)
def test_presets_on_24_blocks(spec, terms):
    sel = parse_layers(spec, 24)
    assert [list(t) for t in sel.terms] == terms
    assert sel.base == tuple(terms[-1])
    assert sel.layers == sorted({i for t in terms for i in t})


def test_explicit_lists_negative_and_groups():
    assert parse_layers("4,12,20", 24).terms == ((4,), (12,), (20,))
    assert parse_layers("-2", 24).terms == ((23,),)
    assert parse_layers("-1", 12).terms == ((12,),)
    assert parse_layers("12,", 24).terms == ((12,),)
    assert parse_layers([3, -2], 24).terms == ((3,), (23,))
    assert parse_layers([7], 24).terms == ((7,),)
    assert parse_layers(18, 24).terms == ((18,), (23,))  # an int is the preset, like the string
    sel = parse_layers("1:6,7:12,13:18,19:24,23", 24)
    assert sel.terms == parse_layers("igva", 24).terms
    assert sel.has_groups and sel.positions()[0] == tuple(range(6))
    # explicit indices are absolute, never scaled
    assert parse_layers("4,10,-1", 12).terms == ((4,), (10,), (12,))
    with pytest.raises(LayerSpecError, match="does not exist"):
        parse_layers("4,12,20", 12)


def test_positions_follow_sorted_layers():
    sel = parse_layers("18,3,-2", 24)  # explicit order kept in terms, reads are sorted
    assert sel.layers == [3, 18, 23]
    assert sel.positions() == ((1,), (0,), (2,))


@pytest.mark.parametrize("depth", [6, 12, 27, 32, 40])
def test_presets_scale_and_stay_distinct(depth):
    for spec in ("18", "3-18", "3-18-23", "mmfuser", "igva", "former", "latter", "all"):
        sel = parse_layers(spec, depth)
        if spec not in ("igva", "former", "latter", "all"):  # group presets may overlap the base
            assert len(sel.layers) == len(sel.terms), (spec, depth, sel.terms)
        assert all(0 <= i <= depth for i in sel.layers)
        assert sel.base == (depth - 1,)
    groups = parse_layers("igva", depth).extra
    flat = [i for g in groups for i in g]
    assert flat == list(range(1, depth + 1)), "groups partition the blocks"


def test_scaling_examples():
    assert parse_layers("mmfuser", 12).terms == ((2,), (4,), (7,), (9,), (11,))
    assert parse_layers("3-18-23", 12).terms == ((2,), (9,), (11,))
    assert parse_layers("former", 12).terms == (tuple(range(1, 7)), (11,))
    assert scale_index(18, 32) == 24 and scale_index(3, 32) == 4
    # a preset that collides on a shallow encoder moves the later layer up ...
    assert parse_layers("mmfuser", 6).terms == ((1,), (2,), (3,), (4,), (5,))  # 18 -> 4.5 -> 5 = base -> 4
    # ... and a depth too shallow for distinct layers is an error
    with pytest.raises(LayerSpecError, match="distinct"):
        parse_layers("mmfuser", 3)


@pytest.mark.parametrize("bad, msg", [("", "empty"), ("foo", "unknown layer spec"), ("3-3", "repeats"), ("23-18", "comes last"), ("3-30", "outside"), ("6:1,", "backwards"), ("1,x", "cannot read")])
def test_bad_specs(bad, msg):
    with pytest.raises(LayerSpecError, match=msg):
        parse_layers(bad, 24)


def test_llm_layer_mapping():
    assert [llm_layer_for(k, 24, 24) for k in (3, 18, 23)] == [2, 17, 22]
    assert [llm_layer_for(k, 24, 32) for k in (3, 18)] == [3, 23]
    assert llm_layer_for(1, 24, 4) == 0  # clamped at the first layer
