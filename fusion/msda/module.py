"""`MSDeformAttn`: Deformable-DETR's multi-scale deformable attention module (docs/methods.md#msdeformattn).

    query [B, Q, D], reference_points [B, Q, 2] or [B, Q, L, 2] (x, y in [0, 1]),
    input_flatten [B, S, D] (L levels, S = sum h_l*w_l) -> [B, Q, D]

value_proj / output_proj Linear(D, D); sampling_offsets Linear(D, H*L*P*2); attention_weights
Linear(D, H*L*P) with one softmax over L*P per head; loc = ref + offset / (w_l, h_l).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .function import ms_deform_attn


def reference_grid(h: int, w: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel centres ((j+0.5)/w, (i+0.5)/h) as (x, y), row-major: [h*w, 2]."""
    ys, xs = torch.meshgrid(
        (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
        (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
        indexing="ij",
    )
    return torch.stack([xs, ys], dim=-1).reshape(h * w, 2)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, impl: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.impl = d_model, n_levels, n_heads, n_points, impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR's init: a star of offsets per head, uniform attention, xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)  # [H, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: torch.Tensor,  # [B, Q, D]
        reference_points: torch.Tensor,  # [B, Q, 2] or [B, Q, L, 2]
        input_flatten: torch.Tensor,  # [B, S, D]
        spatial_shapes: torch.Tensor,  # [L, 2] (h, w)
        level_start_index: torch.Tensor,  # [L]
        input_padding_mask: torch.Tensor | None = None,  # [B, S] True = padding
    ) -> torch.Tensor:  # [B, Q, D]
        b, q, _ = query.shape
        s = input_flatten.shape[1]
        h, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        if spatial_shapes.shape[0] != n_levels:
            raise ValueError(f"MSDeformAttn built for {n_levels} levels got spatial_shapes for {spatial_shapes.shape[0]}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(b, s, h, self.d_model // h)
        offsets = self.sampling_offsets(query).view(b, q, h, n_levels, n_points, 2).float()
        attn = self.attention_weights(query).view(b, q, h, n_levels * n_points).float().softmax(-1)
        attn = attn.view(b, q, h, n_levels, n_points)
        ref = reference_points.float()
        if ref.dim() == 3:
            ref = ref[:, :, None, :].expand(b, q, n_levels, 2)
        normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets)  # (w, h) [L, 2]
        loc = ref[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]  # [B, Q, H, L, P, 2]
        out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn, impl=self.impl)
        return self.output_proj(out)
