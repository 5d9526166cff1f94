"""The MSDeformAttn float64 reference the fusion and plugins_trt tests share: a plain Python loop written from
the formula in docs/methods.md#msdeformattn."""

from __future__ import annotations

import math

import torch


def loop_reference(value, shapes, starts, loc, attn):
    """sum_{l,p} attn * bilinear(value_l, x*w_l - 0.5, y*h_l - 0.5), zero outside; plain Python, float64."""
    b_, _, h_, dh = value.shape
    _, q_, _, n_levels, n_points, _ = loc.shape
    out = torch.zeros(b_, q_, h_, dh, dtype=torch.float64)
    for b in range(b_):
        for q in range(q_):
            for h in range(h_):
                for lvl in range(n_levels):
                    hh, ww = (int(s) for s in shapes[lvl])
                    s0 = int(starts[lvl])
                    for p in range(n_points):
                        x = float(loc[b, q, h, lvl, p, 0]) * ww - 0.5
                        y = float(loc[b, q, h, lvl, p, 1]) * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(dh, dtype=torch.float64)
                        for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= cx < ww and 0 <= cy < hh:
                                wgt = (1 - abs(x - cx)) * (1 - abs(y - cy))
                                acc += wgt * value[b, s0 + cy * ww + cx, h].double()
                        out[b, q, h] += float(attn[b, q, h, lvl, p]) * acc
    return out.reshape(b_, q_, h_ * dh)
