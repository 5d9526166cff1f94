"""The KV cache of a Hugging Face causal LM, under the name its transformers version uses.

transformers 5.24 renamed the KV-cache argument of the models and decoder layers, and the field of their
outputs, from `past_key_values` to `cache`. The old name still works there until 5.40, but every call that uses
it logs a deprecation warning, and a forward pre-hook that looks for `past_key_values` in a decoder layer's
keyword arguments no longer finds the cache (so it would place a decoding step at position 0). Up to 5.23 only
`past_key_values` exists (decoder layers of 4.x also took `past_key_value`).

Everything in layerfuse that hands a cache to an LLM, reads one from its output, or finds it among a decoder
layer's arguments goes through this module:

    llm(input_ids=ids, **cache_kwargs(llm, cache))   # cache=... or past_key_values=...
    output_cache(out)                                # out.cache or out.past_key_values, without the warning
    layer_cache(kwargs)                              # in a decoder layer's forward pre-hook
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from torch import nn

CACHE = "cache"  # transformers >= 5.24
LEGACY = ("past_key_values", "past_key_value")  # transformers <= 5.23 (`past_key_value`: 4.x decoder layers)


def cache_argument(llm: nn.Module) -> str:
    """The keyword under which `llm` takes its KV cache: `cache` where its forward has that parameter
    (transformers >= 5.24), else `past_key_values`. A PEFT wrapper answers for the model it wraps."""
    get_base_model = getattr(llm, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else llm
    return _argument_of(type(base))


@functools.cache
def _argument_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters  # follows the deprecation wrapper's __wrapped__
    return CACHE if CACHE in parameters else LEGACY[0]


def cache_kwargs(llm: nn.Module, cache: Any) -> dict[str, Any]:
    """{name: cache} to pass to `llm`; empty when there is no cache to pass."""
    return {} if cache is None else {cache_argument(llm): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a model returned (`cache` or `past_key_values` field of its output), or None."""
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
    for name in (CACHE, *LEGACY):
        if name in names:
            return getattr(out, name)
    return None


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a decoder layer's keyword arguments, or None."""
    for name in (CACHE, *LEGACY):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cached_tokens(cache: Any, layer_idx: int = 0) -> int:
    """Tokens already in a KV cache (a transformers `Cache`, or the legacy tuple of (key, value) per layer)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length(layer_idx))
    if isinstance(cache, (tuple, list)) and len(cache) > layer_idx and cache[layer_idx] is not None:
        return int(cache[layer_idx][0].shape[-2])
    return 0
