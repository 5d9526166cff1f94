"""MSDeformAttn reference implementation with `F.grid_sample` (Deformable-DETR's PyTorch path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_grid_sample(
    value: torch.Tensor,  # [B, S, H, Dh]
    spatial_shapes: torch.Tensor,  # [L, 2] (h, w)
    level_start_index: torch.Tensor,  # [L]
    sampling_locations: torch.Tensor,  # [B, Q, H, L, P, 2] (x, y) in [0, 1]
    attention_weights: torch.Tensor,  # [B, Q, H, L, P]
) -> torch.Tensor:  # [B, Q, H*Dh] in fp32 (fp64 for fp64 value); the dispatcher casts to value's dtype
    """Per level: bilinear grid_sample (zeros padding, align_corners=False) on grid 2*loc-1, weight, sum."""
    b, _, h, dh = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    shapes = [(int(hh), int(ww)) for hh, ww in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    grids = 2 * sampling_locations.to(acc) - 1  # [B, Q, H, L, P, 2]
    sampled = []
    for lvl, (hh, ww) in enumerate(shapes):
        v = value[:, starts[lvl] : starts[lvl] + hh * ww].to(acc)  # [B, hw, H, Dh]
        v = v.permute(0, 2, 3, 1).reshape(b * h, dh, hh, ww)  # [B*H, Dh, h, w]
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * h, q, n_points, 2)  # [B*H, Q, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # [B*H, Dh, Q, P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*H, Dh, Q, L*P]
    w = attention_weights.to(acc).transpose(1, 2).reshape(b * h, 1, q, n_levels * n_points)
    out = (stacked * w).sum(-1)  # [B*H, Dh, Q]
    return out.view(b, h * dh, q).transpose(1, 2)
