"""Which hidden states a cache stores: `layerfuse extract --layers SPEC[;SPEC...]` -> sorted hidden-state indices,
and which group means it stores beside them: `--views SPEC[;SPEC...]` -> the group terms of those specs.

Each SPEC is one of
  * `all`: every hidden state hs[0..L] (the default; note that the *fuser* preset `all` reads hs[1..L]);
  * a fuser name (`concat`, `mmfuser`, `igva`, `sti`, ...): the layers of that fuser's default layer spec;
  * any layer spec of docs/methods.md#layer-indexing-and-presets (`3-18-23`, `mmfuser`, `former`, `4,12,20`,
    `1:6,7:12,23`, ...), resolved for the encoder's depth L exactly as a fuser resolves it.
The cache stores the union, in increasing order. A name that is both a fuser and a preset (`mmfuser`, `igva`)
means the same layers either way.
"""

from __future__ import annotations

from layerfuse.fusion.layers import LayerSpecError, parse_layers
from layerfuse.fusion.registry import fuser_class, list_fusers

ALL = "all"


def stored_layers(spec: str | None, num_blocks: int) -> list[int]:
    """The sorted hidden-state indices (0..num_blocks) that `spec` asks a cache to store (None: all)."""
    parts = [p.strip() for p in (spec or ALL).split(";") if p.strip()]
    if not parts:
        raise LayerSpecError(f"--layers {spec!r} names no layers; give e.g. 'all', 'mmfuser;igva' or '3-18-23'")
    out: set[int] = set()
    for part in parts:
        if part == ALL:
            out.update(range(num_blocks + 1))
            continue
        layer_spec = fuser_class(part).config_class().layers if part in list_fusers() else part
        try:
            out.update(parse_layers(layer_spec, num_blocks).layers)
        except LayerSpecError as e:
            raise LayerSpecError(f"--layers: {part!r}: {e} (or a fuser name: {', '.join(list_fusers())}; or 'all')") from None
    return sorted(out)


def view_groups(spec: str | None, num_blocks: int) -> list[tuple[int, ...]]:
    """The group means `--views` asks a cache to store: every group term (2 or more hidden states) of the named fusers'
    default specs and of the layer specs, resolved for depth `num_blocks`, sorted; single layers are ignored (they
    are stored by --layers). None or "" -> none. E.g. 'igva' -> the four IGVA groups; 'all' -> former and latter."""
    out: set[tuple[int, ...]] = set()
    for part in [p.strip() for p in (spec or "").split(";") if p.strip()]:
        layer_spec = fuser_class(part).config_class().layers if part in list_fusers() else part
        try:
            terms = parse_layers(layer_spec, num_blocks).terms
        except LayerSpecError as e:
            raise LayerSpecError(f"--views: {part!r}: {e} (or a fuser name: {', '.join(list_fusers())})") from None
        out.update(t for t in terms if len(t) > 1)
    return sorted(out)


def describe_layers(layers: list[int], num_blocks: int) -> str:
    """'all 25 (hs[0..24])' or 'hs[3, 8, 13, 18, 23] (5 of 25)'."""
    if layers == list(range(num_blocks + 1)):
        return f"all {num_blocks + 1} (hs[0..{num_blocks}])"
    return f"hs{layers} ({len(layers)} of {num_blocks + 1})"


def input_name(item: int | tuple[int, ...] | list[int]) -> str:
    """A stored input by its name: hidden state 'hs[12]', or group-mean view 'mean(hs[1..12])'."""
    return f"hs[{item}]" if isinstance(item, int) else f"mean(hs[{item[0]}..{item[-1]}])"
