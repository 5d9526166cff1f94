"""MSDeformAttn by index gathering: bilinear sampling as row indices into the value table plus coefficients.

The value [B, S, H, Dh] is read as one flat table [B*S*H, Dh] (a view, no copy). Every bilinear corner of every
sampling point is a row of it, `(b*S + start_l + y*w_l + x)*H + h`, with the coefficient bilinear weight x
attention weight (0 for corners outside their level: zero padding). The output row (b, q, h) is the
coefficient-weighted sum of its K = L*P*4 rows, so the whole operator is one sparse matrix
A [B*Q*H, B*S*H] (K non-zeros per row) times the table:

    out [B*Q*H, Dh] = A @ table

Two executions of that one formula:

* `gather_plain` - plain ops only (Floor, comparisons, integer index math, index_select = ONNX Gather, bmm =
  MatMul), differentiable by autograd, no data-dependent Python control flow (level sizes are tensors), dynamic
  batch and query count. What tracing / torch.export / torch.compile see; the ONNX graph in
  `layerfuse.export.msda_onnx.msda_gather` is the same computation. Its intermediate is the gathered
  [B*Q*H, K, Dh] block.
* `GatherFunction` - the eager path, an autograd.Function: A as a CSR matrix (int32 indices when they fit),
  forward one sparse x dense product, backward by hand: grad_table = A^T @ grad_out (A^T built by one stable
  sort of the column indices: sorted segment sums), grad of the coefficients = grad_out . table sampled at A's
  non-zeros (`torch.sparse.sampled_addmm`, no [.., K, Dh] intermediate), then the chain rule to the attention
  weights and the sampling locations (right derivative at integer pixel coordinates, as grid_sample's backward).
  Largest intermediate: the K coefficients per output row.

Both accumulate in fp32 for fp16 / bf16 value (the table is read as fp32), fp64 for fp64 value, and return that
accumulation dtype; `ms_deform_attn` casts to value's dtype.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

# corner order of the last axis [.., 4]: (dx, dy) offsets from (floor x, floor y)
CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def _acc_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


class Sampling(NamedTuple):
    """The bilinear corners of every point, separable in x and y: corner (dx, dy) of a point is table row
    `rows[.., 1, dy] + rows[.., 0, dx]` with weight `weights[.., 1, dy] * weights[.., 0, dx]` (x attention)."""

    rows: torch.Tensor  # [B, Q, H, L, P, 2 (x, y), 2 (corner)] x*H and (b*S + start_l + y*w_l)*H + h, clamped into the level
    weights: torch.Tensor  # [B, Q, H, L, P, 2, 2] (1 - f, f) per coordinate, 0 where that column / row is outside
    inside: torch.Tensor  # [B, Q, H, L, P, 2, 2] 1 / 0 in the accumulation dtype


def sampling(
    value_shape: torch.Size,  # (B, S, H, Dh)
    spatial_shapes: torch.Tensor,  # [L, 2] (h, w)
    level_start_index: torch.Tensor,  # [L]
    sampling_locations: torch.Tensor,  # [B, Q, H, L, P, 2] in the accumulation dtype
    index: torch.dtype = torch.long,  # int64, or int32 when B*S*H fits
) -> Sampling:
    """Rows and weights of the corners (plain ops, level sizes as tensors: traceable with dynamic shapes).
    x and y go through the same ops side by side (few, larger ops: each op costs a thread fork/join on CPU);
    the 4 corners only appear when `corners` combines them."""
    b, s, h, _ = value_shape
    n_levels = sampling_locations.shape[3]
    acc = sampling_locations.dtype
    size = spatial_shapes.to(index).flip(-1).view(1, 1, 1, n_levels, 1, 2)  # (w, h) of each level
    size_f = size.to(acc)
    # far-outside points only touch zero-padded corners; clamping keeps the integer casts in range
    pix = (sampling_locations * size_f - 0.5).clamp(min=-2.0).minimum(size_f + 0.5)  # [B, Q, H, L, P, 2] pixel coords
    low = torch.floor(pix)
    frac = pix - low
    corner = low.to(index)[..., None] + torch.arange(2, device=pix.device, dtype=index)  # [B, Q, H, L, P, 2, 2]
    size = size[..., None]
    inside = ((corner >= 0) & (corner < size)).to(acc)
    corner = corner.clamp(min=0).minimum(size - 1)
    # table row = (b*S + start_l + y*w_l)*H + h + x*H: per-coordinate strides (H, w_l*H), the rest one offset
    stride = torch.stack([torch.ones_like(size[..., 0, 0]), size[..., 0, 0]], -1)[..., None] * h  # [1, 1, 1, L, 1, 2, 1]
    batch = torch.arange(b, device=pix.device, dtype=index).view(-1, 1, 1, 1, 1) * s
    head = torch.arange(h, device=pix.device, dtype=index).view(1, 1, -1, 1, 1)
    offset = (batch + level_start_index.to(index).view(1, 1, 1, n_levels, 1)) * h + head  # [B, 1, H, L, 1]
    rows = corner * stride + torch.stack([torch.zeros_like(offset), offset], -1)[..., None]
    weights = torch.stack([1 - frac, frac], -1) * inside
    return Sampling(rows, weights, inside)


def corners(smp: Sampling, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows, coefficients [B, Q, H, L, P, 4] of the corners, (dx, dy) at index dx + 2*dy; attn [B, Q, H, L, P]."""
    rows = (smp.rows[..., 1, :, None] + smp.rows[..., 0, None, :]).flatten(-2)
    coef = ((smp.weights[..., 1, :] * attn[..., None])[..., :, None] * smp.weights[..., 0, None, :]).flatten(-2)
    return rows, coef


def gather_plain(
    value: torch.Tensor,  # [B, S, H, Dh]
    spatial_shapes: torch.Tensor,  # [L, 2] (h, w)
    level_start_index: torch.Tensor,  # [L]
    sampling_locations: torch.Tensor,  # [B, Q, H, L, P, 2] (x, y) in [0, 1]
    attention_weights: torch.Tensor,  # [B, Q, H, L, P]
) -> torch.Tensor:  # [B, Q, H*Dh] in fp32 (fp64 for fp64 value)
    """Plain-op formulation (traceable, autograd through it): index_select of the K rows + one bmm."""
    b, _, h, dh = value.shape
    q = sampling_locations.shape[1]
    acc = _acc_dtype(value)
    smp = sampling(value.shape, spatial_shapes, level_start_index, sampling_locations.to(acc))
    rows, coef = corners(smp, attention_weights.to(acc))
    table = value.reshape(-1, dh)  # [B*S*H, Dh]
    picked = table.index_select(0, rows.reshape(-1)).to(acc).view(b * q * h, -1, dh)  # [B*Q*H, K, Dh]
    return torch.bmm(coef.view(b * q * h, 1, -1), picked).view(b, q, h * dh)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class GatherFunction(torch.autograd.Function):
    """Eager gather path: sparse (CSR) forward, hand-written backward (module docstring)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        b, s, h, dh = value.shape
        q, n_levels, n_points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
        acc = _acc_dtype(value)
        loc, attn = sampling_locations.to(acc), attention_weights.to(acc)
        n_rows, n_cols, k = b * q * h, b * s * h, n_levels * n_points * 4
        index = torch.int32 if max(n_rows * k, n_cols) < 2**31 - 1 else torch.int64
        smp = sampling(value.shape, spatial_shapes, level_start_index, loc, index)
        rows, coef = corners(smp, attn)
        col, coef = rows.view(-1), coef.view(-1)  # [B*Q*H*K]
        crow = torch.arange(0, n_rows * k + 1, k, device=value.device, dtype=index)  # [B*Q*H + 1]
        table = value.reshape(n_cols, dh).to(acc)  # [B*S*H, Dh]; a copy only for reduced precision
        out = (_csr(crow, col, coef, (n_rows, n_cols)) @ table).view(b, q, h * dh)
        ctx.save_for_backward(value, spatial_shapes, attn, col, crow, coef, smp.weights, smp.inside)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # grad_out [B, Q, H*Dh]
        value, spatial_shapes, attn, col, crow, coef, weights, inside = ctx.saved_tensors
        b, s, h, dh = value.shape
        n_rows, n_cols, k = grad_out.shape[0] * grad_out.shape[1] * h, b * s * h, attn.shape[3] * attn.shape[4] * 4
        acc = attn.dtype
        g = grad_out.to(acc).reshape(n_rows, dh).contiguous()  # [B*Q*H, Dh]
        grad_value = grad_loc = grad_attn = None
        if ctx.needs_input_grad[0]:
            # A^T: the non-zeros sorted by column (stable: each table row sums its terms in a fixed order)
            col_sorted, order = torch.sort(col, stable=True)
            crow_t = torch.searchsorted(col_sorted, torch.arange(n_cols + 1, device=col.device, dtype=col.dtype), out_int32=col.dtype == torch.int32)
            row_t = torch.div(order, k, rounding_mode="floor").to(col.dtype)
            grad_table = _csr(crow_t, row_t, coef[order], (n_cols, n_rows)) @ g  # [B*S*H, Dh]
            grad_value = grad_table.view(value.shape).to(value.dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            table = value.reshape(n_cols, dh).to(acc)
            # d out / d coef of every non-zero: <grad_out row, table row>, only at A's non-zeros
            gc = torch.sparse.sampled_addmm(_csr(crow, col, coef, (n_rows, n_cols)), g, table.t(), beta=0.0).values()
            gc = gc.view(*attn.shape, 2, 2)  # [B, Q, H, L, P, 2 (dy), 2 (dx)]
            # d out / d weights[.., c, corner]: summed over the other coordinate's corners
            per_x = (gc * weights[..., 1, :, None]).sum(-2)  # [B, Q, H, L, P, 2 (dx)]
            if ctx.needs_input_grad[4]:
                grad_attn = (per_x * weights[..., 0, :]).sum(-1)  # [B, Q, H, L, P]
            if ctx.needs_input_grad[3]:
                per_y = (gc * weights[..., 0, None, :]).sum(-1)  # [B, Q, H, L, P, 2 (dy)]
                # weights = (1 - f, f) * inside: d / d f = (-inside_0, inside_1); d f / d loc = level size
                per = torch.stack([per_x, per_y], -2) * inside  # [B, Q, H, L, P, 2, 2]
                size = spatial_shapes.flip(-1).to(acc).view(1, 1, 1, -1, 1, 2)  # (w, h)
                grad_loc = (per[..., 1] - per[..., 0]) * attn[..., None] * size  # [B, Q, H, L, P, 2]
        return grad_value, None, None, grad_loc, grad_attn


def _traced() -> bool:
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
    )


def ms_deform_attn_gather(
    value: torch.Tensor,  # [B, S, H, Dh]
    spatial_shapes: torch.Tensor,  # [L, 2] (h, w)
    level_start_index: torch.Tensor,  # [L]
    sampling_locations: torch.Tensor,  # [B, Q, H, L, P, 2] (x, y) in [0, 1]
    attention_weights: torch.Tensor,  # [B, Q, H, L, P]
) -> torch.Tensor:  # [B, Q, H*Dh] in fp32 (fp64 for fp64 value)
    """The gather implementation: `GatherFunction` eagerly, `gather_plain` under tracing / export / compile."""
    if _traced() or value.numel() == 0 or attention_weights.numel() == 0:
        return gather_plain(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return GatherFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
