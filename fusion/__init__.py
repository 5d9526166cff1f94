"""layerfuse.fusion: every multi-layer fusion family, built by name from one registry.

    from layerfuse.fusion import build_fuser, VisionSpec, LLMSpec
    fuser = build_fuser("mmfuser", VisionSpec.from_cache(cache), LLMSpec.from_config(llm.config))
    fuser.use_views(cache.views)                     # group terms from stored group means, where the cache has them
    cache.features(rows, fuser.required_inputs)  # [B, k, T, D]: only the layers (and means) it needs

Fusers: single, concat, sti, mmfuser, igva, tgif, tokenpacker (external: they produce the visual tokens) and
inject, xattn, deepstack (internal: they also act inside the LLM through hooks; see VisionLanguageModel).
"""

from . import concat, deepstack, igva, inject, mmfuser, single, sti, tgif, tokenpacker, xattn  # noqa: F401  (registers the fusers)
from .base import Fuser, FuserBuildError, FuserConfig, FuserOutput, LLMSpec, VisionSpec
from .layers import LayerSelection, LayerSpecError, parse_layers
from .msda import ms_deform_attn
from .registry import build_fuser, fuser_class, fuser_config, list_fusers, register_fuser
from .vlm import VisionLanguageModel, VLMOutput

__all__ = [
    "Fuser", "FuserBuildError", "FuserConfig", "FuserOutput", "LLMSpec", "VisionSpec", "LayerSelection",
    "LayerSpecError", "parse_layers", "ms_deform_attn", "build_fuser", "fuser_class", "fuser_config",
    "list_fusers", "register_fuser", "VisionLanguageModel", "VLMOutput",
]
