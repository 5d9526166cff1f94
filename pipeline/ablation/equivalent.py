"""Equivalent variants (probe mode): two variants of a sweep that compute the same function train once.

Two valid variants are equivalent when

* their seeds are equal (the same data order, the same initialisation stream);
* their fusers compute the same function of the same inputs (`function_key`): the same fuser, or `concat` with one
  term, which computes `single`'s function (projector(cat[term]) = projector(term)), on the same resolved terms (the
  layer specs may differ: `penultimate` and `23,` are hs[23] alone), with the same resolved options (`fuser_config`
  defaults filled in, layers aside);
* and, checked by building both under the seed on the CPU, the same parameters (names, shapes and values, bit for bit)
  and the same torch RNG state afterwards, so the probe head built next starts the same as well.

Then training them gives the same numbers; the first in sweep order trains, the others' records are its record with
`same_as` naming it (pipeline/ablation/run.py), listed in results.md. lm mode does not look for equivalents (an
internal fuser's hooks depend on how the spec was written, `LayerSelection.base_listed`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser, fuser_config, parse_layers
from layerfuse.pipeline.ablation.sweep import Variant

ONE_TERM_AS = {"concat": "single"}  # fuser -> the fuser whose function it computes on a one-term selection


def function_key(v: Variant, vision: VisionSpec) -> tuple:
    """(fuser family, resolved terms, resolved options, seed): equal keys = candidates for the same function."""
    terms = parse_layers(v.layers, vision.num_layers).terms
    family = ONE_TERM_AS.get(v.fuser, v.fuser) if len(terms) == 1 else v.fuser
    options = {k: val for k, val in fuser_config(v.fuser, **v.options).options().items() if k != "layers"}
    return family, terms, json.dumps(options, sort_keys=True, default=str), v.seed


def _built(v: Variant, vision: VisionSpec, llm: LLMSpec) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The fuser's state under the variant's seed, and the RNG state after building it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(v.seed)
        fuser = build_fuser(v.fuser, vision, llm, **v.build_options())
        return fuser.state_dict(), torch.random.get_rng_state()


def same_build(a: Variant, b: Variant, vision: VisionSpec, llm: LLMSpec) -> bool:
    """Built under their seed, the two fusers have the same parameters bit for bit and leave the same RNG state."""
    (sa, ra), (sb, rb) = _built(a, vision, llm), _built(b, vision, llm)
    return (torch.equal(ra, rb) and sa.keys() == sb.keys()
            and all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa))


def equivalents(variants: Sequence[Variant], vision: VisionSpec, llm: LLMSpec) -> dict[str, Variant]:
    """{variant id: the earlier variant it is the same as} over the valid variants, in sweep order."""
    first: dict[tuple, list[Variant]] = {}
    same: dict[str, Variant] = {}
    for v in variants:
        if not v.valid:
            continue
        candidates = first.setdefault(function_key(v, vision), [])
        match = next((c for c in candidates if v.num_visual_tokens == c.num_visual_tokens and same_build(c, v, vision, llm)), None)
        if match is None:
            candidates.append(v)
        else:
            same[v.id] = match
    return same
