"""MSDeformAttn, kept apart as in Deformable-DETR's models/ops: the function (`ms_deform_attn` and its
implementations) and the module (`MSDeformAttn`); compiled kernels plug in through `register_kernel`.
The operator contract is docs/methods.md#msdeformattn (summed up in `function.py`)."""

from .function import IMPLS, auto_choice, auto_choices, kernel_available, ms_deform_attn, register_impl, register_kernel, reset_auto, unregister_impl, unregister_kernel
from .gather import GatherFunction, gather_plain, ms_deform_attn_gather
from .grid_sample import ms_deform_attn_grid_sample
from .module import MSDeformAttn, reference_grid

__all__ = [
    "IMPLS", "auto_choice", "auto_choices", "reset_auto", "GatherFunction", "gather_plain", "kernel_available", "ms_deform_attn", "register_impl", "register_kernel", "unregister_impl", "unregister_kernel",
    "ms_deform_attn_gather", "ms_deform_attn_grid_sample", "MSDeformAttn", "reference_grid",
]
