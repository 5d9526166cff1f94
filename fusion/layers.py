"""Layer selection: which encoder hidden states a fuser reads (docs/methods.md#layer-indexing-and-presets).

A ViT with L blocks gives L+1 hidden states `hs[0..L]` (hs[0] = embeddings, hs[i] = output of block i).
A selection is an ordered list of *terms*; each term is one layer or a group of layers that is averaged.
The **last term is the base** (LLaVA's penultimate layer for the presets): the query of MMFuser, the
input-sequence feature of IGVA and the internal fusers, the last channel block of concat.

Spec syntax (`parse_layers`):

| spec | meaning (for L = 24; other depths are scaled) |
|---|---|
| `18`, `3-18`, `3-18-23` | those layers + base 23 (not repeated when already listed) |
| `former` / `latter` / `all` | mean(hs[1..12]) / mean(hs[13..24]) / both, + base 23 |
| `mmfuser` | levels 3, 8, 13, 18, query (base) 23 |
| `igva` | groups 1-6, 7-12, 13-18, 19-24, base 23 |
| `tokenpacker` | 12, 16, 22, base 23 (TokenPacker's multi-level keys) |
| `deepstack` | 8, 15, 22, base 23 (Qwen3-VL's blocks 8, 16, 24 of 27, in 24-block indices) |
| `shallow-middle-deep` | groups 1-12, 13-20, 21-24; the deep group is the base |
| `tgif` | every block hs[1..L], base L-1 last (not scaled: it is every block on any depth) |
| `penultimate` / `last` | 23 alone / 24 alone |
| `4,12,20`, `-2`, `12,` | explicit indices, exactly these, not scaled; negative counts from the end |
| `1:6,7:12,13:18,19:24,23` | explicit groups (`a:b` = mean of hs[a..b], inclusive) |

Presets are written for a 24-block encoder; for depth L each index i becomes round(i*L/24) (half up), groups
keep their partition (a group a..b becomes round((a-1)*L/24)+1 .. round(b*L/24)), the base is the
penultimate layer L-1, and a single layer that collides with an earlier one or the base moves to the free
index nearest its unrounded position i*L/24 (the later one on a tie), so the indices stay distinct.

Each preset term keeps its 24-block preset indices (`LayerSelection.preset`). The LLM-internal fusers map vision layers
onto LLM layers from them (`llm_layer_for`, `internal_plan`: MLVF's m = int(p * L_llm / 24 - 1); the group presets
former / latter / all layer by layer into consecutive LLM layers; docs/methods.md#internal-fusion).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from layerfuse.core.errors import ConfigError

PRESET_DEPTH = 24
PRESET_BASE = 23

# name -> (terms, each a list of 24-block indices; a multi-entry term is a group mean), base appended after.
NAMED_PRESETS: dict[str, tuple[tuple[tuple[int, int], ...], bool]] = {
    # (first, last) inclusive ranges; True = append the base term
    "former": (((1, 12),), True),
    "latter": (((13, 24),), True),
    "all": (((1, 12), (13, 24)), True),
    "mmfuser": (((3, 3), (8, 8), (13, 13), (18, 18)), True),
    "igva": (((1, 6), (7, 12), (13, 18), (19, 24)), True),
    "tokenpacker": (((12, 12), (16, 16), (22, 22)), True),
    # Qwen3-VL-8B's deepstack blocks 8, 16, 24 (0-based) of 27 are hs[9], hs[17], hs[25]: 8, 15, 22 on 24 blocks,
    # which scale back to exactly 9, 17, 25 on a 27-block tower
    "deepstack": (((8, 8), (15, 15), (22, 22)), True),
    "shallow-middle-deep": (((1, 12), (13, 20), (21, 24)), False),
    "penultimate": ((), True),
    "last": (((24, 24),), False),
}
EVERY_BLOCK = "tgif"  # every block hs[1..L] on any depth, the base (L-1) last
PRESETS = ("18", "3-18", "3-18-23", *NAMED_PRESETS, EVERY_BLOCK)
_DASH = re.compile(r"^\d+(-\d+)*$")
_TERM = re.compile(r"^(-?\d+)(?::(-?\d+))?$")


class LayerSpecError(ConfigError):
    """A layer spec that cannot be parsed or does not fit the encoder."""


@dataclass(frozen=True)
class LayerSelection:
    """Resolved selection: hidden-state indices in 0..num_layers (= L), last term = base.

    terms: e.g. ((3,), (18,), (23,)) for `3-18-23`; ((1, ..., 12), (23,)) for `former`.
    """

    spec: str
    num_layers: int  # L, blocks of the encoder
    terms: tuple[tuple[int, ...], ...]
    # the base was written in the spec (`3-18-23`, explicit lists) rather than appended (`3-18`, named presets);
    # the internal fusers then fuse it inside the LLM too (`3-18-23` -> LLM layers {2, 17, 22}; docs/methods.md)
    base_listed: bool = False
    # per term, its indices in the 24-block preset space (`3-18-23` on 27 blocks: terms (3,), (20,), (26,), preset
    # (3,), (18,), (23,)); None for a spec that is not a preset (explicit lists, `tgif`). The internal fusers map a
    # preset's layers onto LLM layers from these (llm_layer_for), as the MLVF authors' code does.
    preset: tuple[tuple[int, ...], ...] | None = None

    @property
    def base(self) -> tuple[int, ...]:
        return self.terms[-1]

    @property
    def extra(self) -> tuple[tuple[int, ...], ...]:
        """Every term but the base."""
        return self.terms[:-1]

    @property
    def layers(self) -> list[int]:
        """Sorted unique hidden-state indices to read from the cache."""
        return sorted({i for t in self.terms for i in t})

    @property
    def has_groups(self) -> bool:
        return any(len(t) > 1 for t in self.terms)

    def inputs(self, views: Iterable[tuple[int, ...]] = ()) -> list[int | tuple[int, ...]]:
        """What to read from a cache that also stores group-mean `views` (docs/cache-format.md): every group term
        that is a view, as that tuple, and the hidden states of the other terms, sorted (ints first, then views)."""
        available = {tuple(v) for v in views}
        as_view = [t for t in self.terms if len(t) > 1 and t in available]
        layers = sorted({i for t in self.terms if t not in as_view for i in t})
        return [*layers, *sorted(set(as_view))]

    def positions(self, inputs: Sequence[int | tuple[int, ...]] | None = None) -> tuple[tuple[int, ...], ...]:
        """Each term as positions into `inputs` (default `layers`: the order features arrive in from the cache); a
        term that is itself an input (a stored group mean) is one position."""
        where = {x: k for k, x in enumerate(self.layers if inputs is None else inputs)}
        return tuple((where[t],) if len(t) > 1 and t in where else tuple(where[i] for i in t) for t in self.terms)

    def describe(self) -> str:
        def term(t: tuple[int, ...]) -> str:
            return str(t[0]) if len(t) == 1 else f"mean({t[0]}..{t[-1]})" if _contiguous(t) else f"mean{list(t)}"

        return f"{self.spec!r} on {self.num_layers} blocks: [{', '.join(term(t) for t in self.extra)}] + base {term(self.base)}"


def _contiguous(t: tuple[int, ...]) -> bool:
    return list(t) == list(range(t[0], t[-1] + 1))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scale_index(i: int, num_layers: int) -> int:
    """A 24-block preset index on an L-block encoder: round(i*L/24), at least 1 for i >= 1."""
    if num_layers == PRESET_DEPTH:
        return i
    return max(1, min(num_layers, _round_half_up(i * num_layers / PRESET_DEPTH))) if i > 0 else 0


def _scale_range(first: int, last: int, num_layers: int) -> tuple[int, ...]:
    if first == last:
        return (scale_index(first, num_layers),)
    lo = _round_half_up((first - 1) * num_layers / PRESET_DEPTH) + 1
    hi = _round_half_up(last * num_layers / PRESET_DEPTH)
    lo, hi = max(1, min(lo, num_layers)), max(1, min(hi, num_layers))
    return tuple(range(lo, max(lo, hi) + 1))


def _distinct(terms: list[tuple[int, ...]], targets: list[float | None], num_layers: int, spec: str) -> list[tuple[int, ...]]:
    """Keep single-layer terms distinct (scaling a preset to a shallow encoder can merge them).

    The base (last term) stays where it is; a colliding extra layer (targets[k] = its unrounded scaled
    position, None for group terms) moves to the free index nearest that position, the later one on a tie.
    Group terms may overlap single layers (the base lies inside `latter`).
    """
    used = {terms[-1][0]} if len(terms[-1]) == 1 else set()
    out = []
    for t, target in zip(terms[:-1], targets):
        if target is not None:
            i = t[0]
            free = [j for j in range(1, num_layers + 1) if j not in used]
            if not free:
                raise LayerSpecError(f"layer spec {spec!r} needs more distinct layers than a {num_layers}-block encoder has")
            if i in used:
                i = min(free, key=lambda j: (abs(j - target), -j))
            used.add(i)
            t = (i,)
        out.append(t)
    return [*out, terms[-1]]


def parse_layers(spec: str | int | list[int], num_layers: int) -> LayerSelection:
    """Parse a layer spec against an encoder with `num_layers` blocks (the cache holds num_layers+1 states)."""
    if num_layers < 1:
        raise LayerSpecError(f"an encoder needs at least one block, got num_layers={num_layers}")
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(int(i)) for i in spec) + ("," if len(spec) == 1 else "")
    text = str(spec).strip().replace(" ", "")
    if not text:
        raise LayerSpecError("empty layer spec; use e.g. 'penultimate', '3-18-23', 'igva' or '4,12,20'")
    base = (num_layers - 1 if num_layers > 1 else num_layers,)
    base_listed = False
    if text == EVERY_BLOCK:
        terms = [(i,) for i in range(1, num_layers + 1) if (i,) != base]
        return LayerSelection(text, num_layers, (*terms, base))
    if text in NAMED_PRESETS:
        ranges, with_base = NAMED_PRESETS[text]
        terms = [_scale_range(a, b, num_layers) for a, b in ranges]
        targets = [a * num_layers / PRESET_DEPTH if a == b else None for a, b in ranges]
        preset = [tuple(range(a, b + 1)) for a, b in ranges]
        if with_base:
            terms.append(base)
            preset.append((PRESET_BASE,))
    elif _DASH.match(text):
        listed = [int(x) for x in text.split("-")]
        for i in listed:
            if not 0 <= i <= PRESET_DEPTH:
                raise LayerSpecError(f"layer {i} in preset {text!r} is outside 0..24 (presets are written for 24 blocks)")
        if len(set(listed)) != len(listed):
            raise LayerSpecError(f"layer spec {text!r} repeats a layer")
        if PRESET_BASE in listed[:-1]:
            raise LayerSpecError(f"layer spec {text!r}: the base layer {PRESET_BASE} comes last (it is the query / input-sequence layer)")
        terms = [base if i == PRESET_BASE else (scale_index(i, num_layers),) for i in listed]
        preset = [(i,) for i in listed]
        base_listed = PRESET_BASE in listed
        if base not in terms:
            terms.append(base)
            preset.append((PRESET_BASE,))
        targets = [i * num_layers / PRESET_DEPTH for i in listed if i != PRESET_BASE]
    elif "," in text or text.startswith("-"):
        terms = [_explicit_term(part, num_layers, text) for part in text.split(",") if part]
        if not terms:
            raise LayerSpecError(f"layer spec {text!r} lists no layers")
        return LayerSelection(text, num_layers, tuple(terms), base_listed=True)
    else:
        raise LayerSpecError(
            f"unknown layer spec {text!r}: use a preset ({', '.join(PRESETS)}), a dash list like '3-18' "
            "(those layers + the penultimate), or explicit indices like '4,12,20', '-2', '12,' or groups '1:6,7:12,23'"
        )
    terms = _distinct(terms, targets, num_layers, text)
    return LayerSelection(text, num_layers, tuple(terms), base_listed=base_listed, preset=tuple(preset))


def _explicit_term(part: str, num_layers: int, spec: str) -> tuple[int, ...]:
    m = _TERM.match(part)
    if not m:
        raise LayerSpecError(f"cannot read {part!r} in layer spec {spec!r}: expected an index like 12 or -2, or a group 1:6")

    def absolute(x: str) -> int:
        i = int(x)
        j = i + num_layers + 1 if i < 0 else i
        if not 0 <= j <= num_layers:
            raise LayerSpecError(
                f"layer {i} in spec {spec!r} does not exist: the encoder has {num_layers} blocks, "
                f"hidden states 0..{num_layers} (negative indices count from the end, -1 = {num_layers})"
            )
        return j

    first = absolute(m.group(1))
    last = absolute(m.group(2)) if m.group(2) is not None else first
    if last < first:
        raise LayerSpecError(f"group {part!r} in layer spec {spec!r} runs backwards")
    return tuple(range(first, last + 1))


def llm_layer_for(vision_layer: int, vision_depth: int, llm_depth: int, preset_position: int | None = None) -> int:
    """MLVF's injection point, 0-based, clamped to the LLM (docs/methods.md#internal-fusion):

    m = int(p * L_llm / 24 - 1) for a preset's layer at position p of the 24-block preset space (the authors' code
    divides by 24 whatever the tower's depth: `3-18-23` -> 2, 17, 22 on a 24-layer LLM, on any tower);
    m = int(k * L_llm / L - 1) for a layer k of an explicit spec on an L-block tower (no preset position).
    The two agree on 24-block towers."""
    if preset_position is not None:
        raw = int(preset_position * llm_depth / PRESET_DEPTH - 1)
    else:
        raw = int(vision_layer * llm_depth / vision_depth - 1)
    return max(0, min(llm_depth - 1, raw))


# -- the internal fusers' plan: which vision layers enter which LLM layer ----------------------------------------------
MLVF_GROUP_PRESETS = ("former", "latter", "all")  # fused layer by layer by default (group_mode "auto")
GROUP_MODES = ("auto", "per_layer", "mean")
MLVF_GROUP_SIZE = 12  # the authors' former / latter: 12 vision layers each, into 12 consecutive LLM layers


@dataclass(frozen=True)
class InternalPlan:
    """What an LLM-internal fuser fuses (docs/methods.md#internal-fusion).

    selection   the selection it reads: the parsed one, or with each group of a per-layer term replaced by its
                single layers (the base stays last)
    fused_terms indices into selection.terms of the terms fused inside the LLM, in order
    llm_layers  the decoder layer each fused term enters before (same order)
    group_mode  "per_layer" or "mean" ("auto" resolved)
    """

    selection: LayerSelection
    fused_terms: tuple[int, ...]
    llm_layers: tuple[int, ...]
    group_mode: str


def resolve_group_mode(group_mode: str, spec: str, per_layer_default: bool = True) -> str:
    """'auto' -> 'per_layer' for MLVF's group presets (former, latter, all) when `per_layer_default`, else 'mean'."""
    if group_mode not in GROUP_MODES:
        raise LayerSpecError(f"group_mode must be one of {', '.join(GROUP_MODES)}, got {group_mode!r}")
    if group_mode != "auto":
        return group_mode
    return "per_layer" if per_layer_default and spec in MLVF_GROUP_PRESETS else "mean"


def _mlvf_groups(selection: LayerSelection) -> list[tuple[str, tuple[int, ...]]]:
    """The per-layer groups of `former` / `latter` / `all`, each as ('former' | 'latter', its vision layers):
    on a tower of 24 blocks or more the first 12 blocks hs[1..12] and the last 12 hs[L-11..L] (the authors' 12
    projectors per group; on deeper towers the blocks between are not read), on a shallower one the parsed groups."""
    names = {"former": ("former",), "latter": ("latter",), "all": ("former", "latter")}[selection.spec]
    L = selection.num_layers
    out = []
    for name, term in zip(names, selection.extra):
        if L >= PRESET_DEPTH:
            term = tuple(range(1, MLVF_GROUP_SIZE + 1)) if name == "former" else tuple(range(L - MLVF_GROUP_SIZE + 1, L + 1))
        out.append((name, term))
    return out


def _mlvf_llm_layers(groups: list[tuple[str, tuple[int, ...]]], llm_depth: int) -> list[int]:
    """Consecutive LLM layers for the layers of `former` / `latter` / `all`, in order.

    When the LLM has a layer for each (n <= L_llm, n = all the groups' layers): former's r-th layer -> LLM layer r
    (0..11), latter's r-th of G -> L_llm - G + r (the last 12). Otherwise the run is spread over the whole LLM: the
    r-th of the n layers -> floor(r * L_llm / n), so consecutive vision layers share an LLM layer."""
    n = sum(len(t) for _, t in groups)
    if n > llm_depth:
        return [r * llm_depth // n for r in range(n)]
    out = []
    for name, term in groups:
        first = 0 if name == "former" else llm_depth - len(term)
        out += [first + r for r in range(len(term))]
    return out


def internal_plan(selection: LayerSelection, llm_depth: int, group_mode: str = "auto", *, per_layer_default: bool = True,
                  fuse_listed_base: bool = True) -> InternalPlan:
    """Which terms an internal fuser fuses and where (docs/methods.md#internal-fusion).

    Fused: every extra term, and the base when the spec lists it and `fuse_listed_base`. Group terms:
    * 'mean': the group's mean, with one projector, entering where its last layer would (its last preset position
      for a preset, else its last layer);
    * 'per_layer': each layer of the group is its own term with its own projector. `former` / `latter` / `all`
      take the authors' layers and consecutive LLM layers (_mlvf_groups, _mlvf_llm_layers); any other group
      (`igva`'s, explicit `a:b`) puts each layer k at int(k * L_llm / L - 1).
    * 'auto' (default): 'per_layer' for former / latter / all when `per_layer_default`, else 'mean'.
    Single-layer terms: llm_layer_for with the term's preset position (24-block space) when the spec is a preset.
    """
    if llm_depth < 1:
        raise LayerSpecError("the LLM's number of decoder layers must be at least 1")
    mode = resolve_group_mode(group_mode, selection.spec, per_layer_default)
    n = len(selection.terms)
    fused = list(range(n - 1)) + ([n - 1] if selection.base_listed and fuse_listed_base else [])
    L = selection.num_layers
    preset = selection.preset

    def single(t: int, layer: int, j: int = -1) -> int:
        return llm_layer_for(layer, L, llm_depth, preset[t][j] if preset is not None else None)

    if mode == "mean" or not any(len(selection.terms[t]) > 1 for t in fused):
        layers = [single(t, selection.terms[t][-1]) for t in fused]
        return InternalPlan(selection, tuple(fused), tuple(layers), mode)

    terms: list[tuple[int, ...]] = []
    llm_layers: list[int] = []
    new_preset: tuple[tuple[int, ...], ...] | None = None
    if selection.spec in MLVF_GROUP_PRESETS:  # their base is appended, never listed
        groups = _mlvf_groups(selection)
        terms = [(k,) for _, g in groups for k in g]
        llm_layers = _mlvf_llm_layers(groups, llm_depth)
        # 24-block positions: former's r-th layer r + 1, latter's 13 + r (on a 24-block tower, the layers themselves)
        new_preset = (*[((1 if name == "former" else MLVF_GROUP_SIZE + 1) + r,) for name, g in groups for r in range(len(g))],
                      (PRESET_BASE,))
    else:
        for t in range(n - 1):
            term = selection.terms[t]
            if len(term) > 1:
                terms += [(k,) for k in term]
                llm_layers += [llm_layer_for(k, L, llm_depth) for k in term]
            else:
                terms.append(term)
                llm_layers.append(single(t, term[0]))
    k = len(terms)
    expanded = LayerSelection(selection.spec, L, (*terms, selection.base), base_listed=selection.base_listed, preset=new_preset)
    if selection.base_listed and fuse_listed_base:  # the listed base is fused too: it is the last term
        return InternalPlan(expanded, tuple(range(k + 1)), (*llm_layers, single(n - 1, selection.base[0])), mode)
    return InternalPlan(expanded, tuple(range(k)), tuple(llm_layers), mode)
