"""A numpy MSDeformAttn, written from the formula of docs/methods.md#msdeformattn, and the `onnx.reference` op that
runs the custom node with it (so `--msda custom` graphs can be checked without the TensorRT plugin).

    from onnx.reference import ReferenceEvaluator
    ReferenceEvaluator(model, new_ops=[MSDeformAttnOp]).run(None, feeds)
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from layerfuse.plugins_trt.info import ONNX_DOMAIN, PLUGIN_NAME


def ms_deform_attn_numpy(
    value: np.ndarray,  # [B, S, H, Dh]
    spatial_shapes: np.ndarray,  # [L, 2] int (h, w)
    level_start_index: np.ndarray,  # [L] int
    sampling_locations: np.ndarray,  # [B, Q, H, L, P, 2] (x, y) in [0, 1]
    attention_weights: np.ndarray,  # [B, Q, H, L, P]
) -> np.ndarray:  # [B, Q, H*Dh] in value's dtype
    """For each (b, q, h): sum over (l, p) of attn * bilinear(value_l, x*w_l - 0.5, y*h_l - 0.5), zero outside the
    map. Coordinates and accumulation in float64 here (the contract asks for at least fp32)."""
    b, _, n_heads, dh = value.shape
    q = sampling_locations.shape[1]
    out = np.zeros((b, q, n_heads, dh), dtype=np.float64)
    heads = np.arange(n_heads)[None, None, :, None]  # [1, 1, H, 1] broadcast against [B, Q, H, P]
    batch = np.arange(b)[:, None, None, None]
    for lvl, ((hl, wl), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        level = value[:, start : start + hl * wl].astype(np.float64).reshape(b, hl, wl, n_heads, dh)
        x = sampling_locations[:, :, :, lvl, :, 0].astype(np.float64) * wl - 0.5  # [B, Q, H, P]
        y = sampling_locations[:, :, :, lvl, :, 1].astype(np.float64) * hl - 0.5
        attn = attention_weights[:, :, :, lvl].astype(np.float64)
        x0, y0 = np.floor(x), np.floor(y)
        for cx, cy, wgt in (
            (x0, y0, (x0 + 1 - x) * (y0 + 1 - y)),
            (x0 + 1, y0, (x - x0) * (y0 + 1 - y)),
            (x0, y0 + 1, (x0 + 1 - x) * (y - y0)),
            (x0 + 1, y0 + 1, (x - x0) * (y - y0)),
        ):
            inside = (cx >= 0) & (cx < wl) & (cy >= 0) & (cy < hl)
            xi = np.clip(np.nan_to_num(cx), 0, wl - 1).astype(np.int64)
            yi = np.clip(np.nan_to_num(cy), 0, hl - 1).astype(np.int64)
            corner = level[batch, yi, xi, heads]  # [B, Q, H, P, Dh]
            out += ((wgt * attn * inside)[..., None] * corner).sum(axis=3)
    return out.reshape(b, q, n_heads * dh).astype(value.dtype)


class MSDeformAttnOp(OpRun):
    """`onnx.reference` implementation of the custom node (attributes accepted and ignored)."""

    op_domain = ONNX_DOMAIN

    def _run(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
             plugin_version=None, plugin_namespace=None):
        return (ms_deform_attn_numpy(value, spatial_shapes, level_start_index, sampling_locations, attention_weights),)


MSDeformAttnOp.__name__ = PLUGIN_NAME  # onnx.reference matches new ops by class name and op_domain
