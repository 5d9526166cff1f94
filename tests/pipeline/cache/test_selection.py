"""`extract --layers`: which hidden states a cache stores."""

import pytest

from layerfuse.fusion.layers import LayerSpecError
from layerfuse.pipeline.cache.selection import describe_layers, stored_layers


def test_union_of_presets_fusers_and_explicit_lists():
    assert stored_layers(None, 24) == stored_layers("all", 24) == list(range(25))
    assert stored_layers("mmfuser", 24) == [3, 8, 13, 18, 23]
    assert stored_layers("concat", 24) == [3, 18, 23]  # a fuser name: its default layer spec
    assert stored_layers("mmfuser;3-18-23; 4,12,20", 24) == [3, 4, 8, 12, 13, 18, 20, 23]
    assert stored_layers("igva", 24) == list(range(1, 25))  # four group means need every block
    assert stored_layers("mmfuser", 12) == [2, 4, 7, 9, 11]  # scaled to the encoder's depth like a fuser scales it
    assert describe_layers([3, 8], 24) == "hs[3, 8] (2 of 25)" and describe_layers(list(range(13)), 12) == "all 13 (hs[0..12])"


@pytest.mark.parametrize("spec", ["bogus", ";", "99,"])
def test_bad_specs_name_what_is_accepted(spec):
    with pytest.raises(LayerSpecError, match="--layers"):
        stored_layers(spec, 24)
