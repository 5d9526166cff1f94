"""MSDeformAttn by index gathering: bilinear sampling written with Floor / GatherElements-style ops only.

ONNX-friendly (no GridSample, no data-dependent Python control flow: level sizes are used as tensors),
dynamic batch and query count. The value of every level is flattened into one [B*H, S, Dh] table and each
bilinear corner is a flat index `level_start + y*w + x` into it, so no per-level slicing is needed. Corners
outside their level contribute 0 (zero padding). The four corners of every point are gathered at once,
[B*H, Q*4*L*P, Dh], and reduced with their bilinear x attention coefficients by one batched MatMul.
"""

from __future__ import annotations

import torch


def ms_deform_attn_gather(
    value: torch.Tensor,  # [B, S, H, Dh]
    spatial_shapes: torch.Tensor,  # [L, 2] (h, w)
    level_start_index: torch.Tensor,  # [L]
    sampling_locations: torch.Tensor,  # [B, Q, H, L, P, 2] (x, y) in [0, 1]
    attention_weights: torch.Tensor,  # [B, Q, H, L, P]
) -> torch.Tensor:  # [B, Q, H*Dh] in fp32 (fp64 for fp64 value)
    b, s, h, dh = value.shape
    q, n_levels, n_points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    acc = torch.float64 if value.dtype == torch.float64 else torch.float32
    shapes = spatial_shapes.to(acc)
    hl = shapes[:, 0].view(1, 1, 1, n_levels, 1)  # [1, 1, 1, L, 1], level sizes as tensors (traceable)
    wl = shapes[:, 1].view(1, 1, 1, n_levels, 1)
    start = level_start_index.to(torch.long).view(1, 1, 1, n_levels, 1)
    w_int = spatial_shapes[:, 1].to(torch.long).view(1, 1, 1, n_levels, 1)
    h_int = spatial_shapes[:, 0].to(torch.long).view(1, 1, 1, n_levels, 1)
    loc = sampling_locations.to(acc).transpose(1, 2)  # [B, H, Q, L, P, 2]: heads next to batch, like the table
    attn = attention_weights.to(acc).transpose(1, 2)
    x = loc[..., 0] * wl - 0.5  # [B, H, Q, L, P] pixel coordinates
    y = loc[..., 1] * hl - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0l, y0l = x0.to(torch.long), y0.to(torch.long)
    idxs, coefs = [], []
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        cx, cy = x0l + dx, y0l + dy
        inside = (cx >= 0) & (cx < w_int) & (cy >= 0) & (cy < h_int)
        idxs.append(start + cy.clamp(0).minimum(h_int - 1) * w_int + cx.clamp(0).minimum(w_int - 1))
        coefs.append(wgt * attn * inside)
    k = 4 * n_levels * n_points
    idx = torch.stack(idxs, -1).reshape(b * h, q * k, 1).expand(-1, -1, dh)
    coef = torch.stack(coefs, -1).reshape(b * h * q, 1, k)
    table = value.transpose(1, 2).reshape(b * h, s, dh)  # [B*H, S, Dh]
    picked = torch.gather(table, 1, idx).to(acc).view(b * h * q, k, dh)  # [B*H*Q, 4*L*P, Dh]
    out = torch.bmm(coef, picked).view(b, h, q, dh)  # [B*H*Q, 1, 4*L*P] @ -> [B, H, Q, Dh]
    return out.permute(0, 2, 1, 3).reshape(b, q, h * dh)
