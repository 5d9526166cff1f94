"""Quantised storage of feature blocks: int8 and float8 schemes, their calibration, and the error they make.

A block is `x` [B, K, T, D] float (B samples, K stored hidden states, T tokens, D channels), as the vision tower
returns it. A scheme turns a block into named *parts*, the arrays a cache would store per sample, and back; a
calibrated scheme also holds a *state*, stored once per cache. Pure torch: every function runs on the device the
block is on (the extraction device), in float32 internally, and never mixes samples or layers, so quantising a batch
equals quantising its samples one by one, and `layer(k)` quantises layer k alone as the whole block would (encoding
goes layer by layer: float32 temporaries of one layer, [B, 1, T, D], not of the whole block).

| scheme | parts per block | state (stored once) |
|---|---|---|
| `channel` | q int8 [B, K, T, D] | scale float32 [K, D] |
| `token` | q int8 [B, K, T, D], scale float16 [B, K, T] | none |
| `token+outliers` | q int8 [B, K, T, D] (0 in the outlier channels), scale float16 [B, K, T], outliers float16 [B, K, T, n] | channels int64 [K, n] |
| `fp8` | q float8_e4m3fn [B, K, T, D] | none |
| `fp8+token` | q float8_e4m3fn [B, K, T, D], scale float16 [B, K, T] | none |

int8 is symmetric (-127..127, round half to even). Per-token scales are the token's absmax over channels / 127
(/ 448 for fp8), rounded *up* to float16 so that no value exceeds the range. All-zero tokens (rows of text-only
samples) get scale 0 and come back as exact zeros. `channel` clips values beyond the calibration range; `fp8`
saturates at +-448 (float8_e4m3fn has no infinity). `clipped(x)` tells which values a scheme clips, and
`clip_counts(x, parts)` counts them per layer (on a CPU, the int8 token schemes without a pass over x where nothing can
clip; on an accelerator without a host sync).

`ErrorStats` accumulates, per stored layer, the relative RMS error, the largest absolute error, the mean per-token
cosine similarity and the clip rate (what a cache records per layer); `layer_errors` is the one-block form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from layerfuse.core.errors import InputError

INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_DTYPE = torch.float16
SCALE_MAX = float(torch.finfo(SCALE_DTYPE).max)

Parts = dict[str, Tensor]


class QuantizeError(InputError):
    """A block or stored part a scheme cannot use: wrong rank or shape, non-finite values, missing parts."""


def _check_shape(x: Tensor, scheme: str) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise QuantizeError(f"{scheme}: expected a float block [B, K, T, D], got {tuple(x.shape)} {x.dtype}")


def _check_finite(values: Tensor, scheme: str, checked: bool = False) -> None:
    """Raises unless every value is finite (a block, or its token absmax: a nan or inf in a token makes it non-finite).
    `checked`: the caller has checked the block already (extraction, once per image), and this test, a host sync off
    the CPU, is skipped."""
    if not checked and not bool(torch.isfinite(values).all()):
        raise QuantizeError(f"{scheme}: the block holds non-finite values (nan or inf); they cannot be quantised")


def _check_block(x: Tensor, scheme: str, checked: bool = False) -> Tensor:
    """x [B, K, T, D] floating and finite -> float32."""
    _check_shape(x, scheme)
    x = x.float()
    _check_finite(x, scheme, checked)
    return x


def _float_copy(x: Tensor, scheme: str) -> Tensor:
    """x [B, K, T, D] floating -> a float32 copy of it, the caller's to change in place (finiteness is checked later,
    on the token absmax)."""
    _check_shape(x, scheme)
    return x.to(torch.float32, copy=True)


def _part(parts: Parts, name: str, scheme: str) -> Tensor:
    if name not in parts:
        raise QuantizeError(f"{scheme}: part {name!r} missing (got {sorted(parts)})")
    return parts[name]


def token_scale(x: Tensor, top: float) -> Tensor:
    """x [..., D] float32 -> float16 [...]: absmax over channels / top, rounded up to float16 (so |x| / scale <= top),
    0 exactly for all-zero tokens, capped at the float16 maximum (larger tokens clip)."""
    return _scale_of(x.abs().amax(-1), top)


def _scale_of(absmax: Tensor, top: float) -> Tensor:
    """`token_scale` from the tokens' absmax [...] float32."""
    want = absmax / top
    scale = want.to(SCALE_DTYPE)
    low = scale.float() < want  # rounded down: take the next float16 up
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return scale.clamp(max=SCALE_MAX)


def _divide(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale with 0 where scale is 0 (all-zero tokens, never-seen channels)."""
    return torch.where(scale > 0, x / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(x))


def _divide_tokens_(y: Tensor, scale: Tensor) -> Tensor:
    """y [..., D] float32 / scale [...] float16, in place: `_divide` for per-token scales (0 in tokens of scale 0).
    On a CPU the fill runs only where some scale is 0; elsewhere always (a pass costs less than the host sync of
    that test)."""
    zero = scale == 0
    y.div_(torch.where(zero, torch.ones_like(scale), scale).float()[..., None])
    if y.device.type != "cpu" or bool(zero.any()):
        y.masked_fill_(zero[..., None], 0.0)
    return y


def _int8_token_clip_counts(scheme: "QuantScheme", x: Tensor, parts: Parts) -> Tensor:
    """`clip_counts` of the per-token int8 schemes without a pass over x where nothing can clip: a token whose scale
    lies strictly between 0 and the float16 maximum has |x| <= 127 x scale < 127.5 x scale (the scale is rounded up),
    and an outlier below the float16 maximum is stored as it is; any other token or outlier gets `clipped`."""
    if x.device.type != "cpu":  # on an accelerator the pass over x costs less than the host sync of the test below
        return scheme.clipped(x).sum(dim=(0, 2, 3))
    scale = parts["scale"]
    suspect = bool(((scale == 0) | (scale >= SCALE_MAX)).any())
    if "outliers" in parts:
        suspect = suspect or bool((parts["outliers"].float().abs() >= SCALE_MAX).any())
    if suspect:
        return scheme.clipped(x).sum(dim=(0, 2, 3))
    return torch.zeros(x.shape[1], dtype=torch.int64, device=x.device)


def _to_int8_(y: Tensor) -> Tensor:
    """Symmetric int8 codes of y, rounding y in place (y is a temporary)."""
    return y.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def _to_fp8(y: Tensor) -> Tensor:
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _float64_device(device: torch.device) -> torch.device:
    """`device` if it holds float64 tensors (CPU, CUDA), else the CPU (e.g. Apple's MPS has no float64)."""
    try:
        torch.zeros(1, dtype=torch.float64, device=device)
    except (RuntimeError, TypeError):
        return torch.device("cpu")
    return device


class QuantScheme:
    """One way of storing blocks [B, K, T, D]. `quantize` -> parts, `dequantize` -> block; `state` is what is stored
    once (empty for the stateless schemes); `clipped` marks the values the scheme cannot represent."""

    name: ClassVar[str]

    def quantize(self, x: Tensor, *, checked: bool = False) -> Parts:
        """x [B, K, T, D] -> the stored parts. A QuantizeError for non-finite values, unless `checked` (the caller
        has found every value finite: the test is skipped)."""
        raise NotImplementedError

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def clipped(self, x: Tensor) -> Tensor:
        """x [B, K, T, D] -> bool [B, K, T, D]: the values beyond the scheme's range (stored clipped)."""
        raise NotImplementedError

    def clip_counts(self, x: Tensor, parts: Parts) -> Tensor:
        """x [B, K, T, D] and its parts -> int64 [K]: how many values of each layer `clipped` marks."""
        return self.clipped(x).sum(dim=(0, 2, 3))

    def layer(self, k: int) -> "QuantScheme":
        """The scheme of stored layer k alone, for blocks [B, 1, T, D] of that layer (stateless schemes: itself)."""
        return self

    def state(self) -> dict[str, Tensor]:
        return {}

    @classmethod
    def calibrate(cls, x: Tensor, **options: float) -> "QuantScheme":
        """The scheme calibrated on the block x [B, K, T, D] (the first samples); stateless schemes ignore x."""
        if options:
            raise QuantizeError(f"{cls.name}: no calibration options, got {sorted(options)}")
        return cls()

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> "QuantScheme":
        return cls()


@dataclass
class ChannelInt8(QuantScheme):
    """int8 with one scale per (layer, channel), the absmax over the calibration tokens / 127; values beyond it clip.

    state: scale float32 [K, D]; parts: q int8 [B, K, T, D].
    """

    scale: Tensor  # [K, D] float32
    name: ClassVar[str] = "channel"

    @classmethod
    def calibrate(cls, x: Tensor, *, headroom: float = 1.0) -> "ChannelInt8":
        """headroom > 1 widens the range (fewer clips, coarser steps)."""
        x = _check_block(x, cls.name)
        return cls(x.abs().amax(dim=(0, 2)) * (headroom / INT8_MAX))  # [K, D]

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> "ChannelInt8":
        return cls(_part(state, "scale", cls.name).float())

    def state(self) -> dict[str, Tensor]:
        return {"scale": self.scale}

    def layer(self, k: int) -> "ChannelInt8":
        return ChannelInt8(self.scale[k : k + 1])

    def _scale_for(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.scale.shape[0] or x.shape[3] != self.scale.shape[1]:
            raise QuantizeError(f"channel: calibrated for [K, D] = {list(self.scale.shape)}, got a block {tuple(x.shape)}")
        return self.scale.to(x.device)[None, :, None, :]  # [1, K, 1, D]

    def quantize(self, x: Tensor, *, checked: bool = False) -> Parts:
        x = _check_block(x, self.name, checked)
        return {"q": _to_int8_(_divide(x, self._scale_for(x)))}  # _divide returns a new tensor

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> Tensor:
        q = _part(parts, "q", self.name)
        return (q.float() * self._scale_for(q)).to(dtype)

    def clipped(self, x: Tensor) -> Tensor:
        x = x.float()
        return x.abs() > (INT8_MAX + 0.5) * self._scale_for(x)


@dataclass
class TokenInt8(QuantScheme):
    """int8 with one float16 scale per (sample, layer, token): the token's absmax over channels / 127.

    parts: q int8 [B, K, T, D], scale float16 [B, K, T].
    """

    name: ClassVar[str] = "token"

    def quantize(self, x: Tensor, *, checked: bool = False) -> Parts:
        y = _float_copy(x, self.name)
        absmax = y.abs().amax(-1)  # [B, K, T]
        _check_finite(absmax, self.name, checked)
        scale = _scale_of(absmax, INT8_MAX)
        return {"q": _to_int8_(_divide_tokens_(y, scale)), "scale": scale}

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> Tensor:
        q, scale = _part(parts, "q", self.name), _part(parts, "scale", self.name)
        return q.to(torch.float32, copy=True).mul_(scale.float()[..., None]).to(dtype)

    def clipped(self, x: Tensor) -> Tensor:
        x = x.float()
        return x.abs() > (INT8_MAX + 0.5) * token_scale(x, INT8_MAX).float()[..., None]

    def clip_counts(self, x: Tensor, parts: Parts) -> Tensor:
        return _int8_token_clip_counts(self, x, parts)


@dataclass
class TokenOutlierInt8(QuantScheme):
    """`token` on all channels but n outlier channels per layer, which are kept in float16 beside the data.

    The outlier channels are chosen at calibration: per layer, the channels whose absmax over the calibration tokens
    exceeds `factor` x the layer's median channel absmax; n = the most any layer has, capped at `max_outliers`, and
    every layer keeps its n largest (so layers with fewer keep some ordinary channels exactly too).

    state: channels int64 [K, n]; parts: q int8 [B, K, T, D] (0 in the outlier channels), scale float16 [B, K, T],
    outliers float16 [B, K, T, n].
    """

    channels: Tensor  # [K, n] int64
    name: ClassVar[str] = "token+outliers"

    @classmethod
    def calibrate(cls, x: Tensor, *, factor: float = 3.0, max_outliers: int = 8) -> "TokenOutlierInt8":
        x = _check_block(x, cls.name)
        absmax = x.abs().amax(dim=(0, 2))  # [K, D]
        median = absmax.median(dim=1, keepdim=True).values  # [K, 1]
        n = min(int(max_outliers), int((absmax > factor * median).sum(dim=1).max()))
        return cls(absmax.topk(n, dim=1).indices.sort(dim=1).values)

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> "TokenOutlierInt8":
        return cls(_part(state, "channels", cls.name).long())

    def state(self) -> dict[str, Tensor]:
        return {"channels": self.channels}

    def layer(self, k: int) -> "TokenOutlierInt8":
        return TokenOutlierInt8(self.channels[k : k + 1])

    def _index(self, x: Tensor) -> Tensor:
        """[B, K, T, n] gather/scatter index for a block like x."""
        b, k, t, _ = x.shape
        if k != self.channels.shape[0]:
            raise QuantizeError(f"token+outliers: calibrated for K = {self.channels.shape[0]} layers, got a block {tuple(x.shape)}")
        return self.channels.to(x.device)[None, :, None, :].expand(b, k, t, -1)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x float32 -> (x with the outlier channels zeroed, the outlier values [B, K, T, n])."""
        index = self._index(x)
        return x.scatter(3, index, 0.0), x.gather(3, index)

    def quantize(self, x: Tensor, *, checked: bool = False) -> Parts:
        y = _float_copy(x, self.name)
        index = self._index(y)
        outliers = y.gather(3, index)  # [B, K, T, n]
        inner = y.scatter_(3, index, 0.0)
        absmax = inner.abs().amax(-1)  # [B, K, T]
        _check_finite(absmax, self.name, checked)
        _check_finite(outliers, self.name, checked)
        scale = _scale_of(absmax, INT8_MAX)
        return {"q": _to_int8_(_divide_tokens_(inner, scale)), "scale": scale, "outliers": outliers.to(SCALE_DTYPE)}

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> Tensor:
        q, scale, outliers = (_part(parts, p, self.name) for p in ("q", "scale", "outliers"))
        x = q.to(torch.float32, copy=True).mul_(scale.float()[..., None])
        return x.scatter_(3, self._index(x), outliers.float()).to(dtype)

    def clipped(self, x: Tensor) -> Tensor:
        inner, outliers = self._split(x.float())
        out = inner.abs() > (INT8_MAX + 0.5) * token_scale(inner, INT8_MAX).float()[..., None]
        return out.scatter(3, self._index(x), outliers.abs() > SCALE_MAX)

    def clip_counts(self, x: Tensor, parts: Parts) -> Tensor:
        return _int8_token_clip_counts(self, x, parts)


@dataclass
class Float8(QuantScheme):
    """A direct cast to float8_e4m3fn, saturating at +-448; values below 2^-9 flush to 0. parts: q float8 [B, K, T, D]."""

    name: ClassVar[str] = "fp8"

    def quantize(self, x: Tensor, *, checked: bool = False) -> Parts:
        return {"q": _to_fp8(_check_block(x, self.name, checked))}

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> Tensor:
        return _part(parts, "q", self.name).float().to(dtype)

    def clipped(self, x: Tensor) -> Tensor:
        return x.float().abs() > FP8_MAX


@dataclass
class Float8Token(QuantScheme):
    """float8_e4m3fn after dividing each token by a float16 scale (its absmax / 448), so every token uses the top of
    the float8 range. parts: q float8 [B, K, T, D], scale float16 [B, K, T]."""

    name: ClassVar[str] = "fp8+token"

    def quantize(self, x: Tensor, *, checked: bool = False) -> Parts:
        y = _float_copy(x, self.name)
        absmax = y.abs().amax(-1)  # [B, K, T]
        _check_finite(absmax, self.name, checked)
        scale = _scale_of(absmax, FP8_MAX)
        return {"q": _divide_tokens_(y, scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), "scale": scale}

    def dequantize(self, parts: Parts, dtype: torch.dtype = torch.float32) -> Tensor:
        q, scale = _part(parts, "q", self.name), _part(parts, "scale", self.name)
        return q.to(torch.float32, copy=True).mul_(scale.float()[..., None]).to(dtype)

    def clipped(self, x: Tensor) -> Tensor:
        x = x.float()
        return x.abs() > FP8_MAX * token_scale(x, FP8_MAX).float()[..., None]

    def clip_counts(self, x: Tensor, parts: Parts) -> Tensor:
        """`clipped` counted with the scales quantize stored (the same `token_scale` of x)."""
        return (x.float().abs() > FP8_MAX * _part(parts, "scale", self.name).float()[..., None]).sum(dim=(0, 2, 3))


SCHEMES: dict[str, type[QuantScheme]] = {c.name: c for c in (ChannelInt8, TokenInt8, TokenOutlierInt8, Float8, Float8Token)}


def calibrate(name: str, x: Tensor, **options: float) -> QuantScheme:
    """The scheme `name` (a key of SCHEMES) calibrated on the block x [B, K, T, D]."""
    if name not in SCHEMES:
        raise QuantizeError(f"unknown quantisation scheme {name!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[name].calibrate(x, **options)


def parts_bytes(parts: Parts) -> int:
    """Bytes of the stored parts, uncompressed (divide by B for bytes per sample)."""
    return sum(p.numel() * p.element_size() for p in parts.values())


@dataclass(frozen=True)
class LayerError:
    """The error of one stored layer over every value seen."""

    rel_rms: float  # ||x - x^|| / ||x|| (Frobenius, over samples, tokens and channels)
    max_abs: float  # max |x - x^|
    cosine: float  # mean over tokens with a nonzero reference of cos(x_t, x^_t) over channels
    clip_rate: float  # fraction of values beyond the scheme's range

    def as_dict(self) -> dict[str, float]:
        return {"rel_rms": self.rel_rms, "max_abs": self.max_abs, "cosine": self.cosine, "clip_rate": self.clip_rate}


@dataclass
class ErrorStats:
    """Per-layer error sums over blocks x [B, K, T, D] and their reconstructions: float64 accumulators on `device` (the
    blocks' device where it has float64, else the CPU), so that adding a block never waits for the device; `host()`
    and `to_json` bring them to the host, once per shard."""

    num_layers: int
    device: torch.device | str = "cpu"
    sq_err: Tensor = field(init=False)  # [K] sum (x - x^)^2
    sq_ref: Tensor = field(init=False)  # [K] sum x^2
    max_abs: Tensor = field(init=False)  # [K]
    cos_sum: Tensor = field(init=False)  # [K] sum of per-token cosines (nonzero reference tokens)
    tokens: Tensor = field(init=False)  # [K] nonzero reference tokens
    clips: Tensor = field(init=False)  # [K] clipped values
    values: Tensor = field(init=False)  # [K] values seen

    FIELDS: ClassVar[tuple[str, ...]] = ("sq_err", "sq_ref", "max_abs", "cos_sum", "tokens", "clips", "values")

    def __post_init__(self) -> None:
        self.device = _float64_device(torch.device(self.device))
        for name in self.FIELDS:
            setattr(self, name, torch.zeros(self.num_layers, dtype=torch.float64, device=self.device))

    def update(self, x: Tensor, x_hat: Tensor, clipped: Tensor | None = None) -> None:
        """Add a block x [B, K, T, D], its reconstruction x_hat (same shape) and its clip mask (bool, same shape).

        Computed on the block's device one layer at a time: per token over the channels in float32, then over tokens
        in float64. A ViT-L/14-336 batch of 32 needs one layer's [B, T, D] float32 at a time, not a float64 copy of the
        block; on a CPU this is 2.6x faster than float64 sums over every value (`cache derive` to int8), equal to 1e-8."""
        if x.shape != x_hat.shape or x.ndim != 4 or x.shape[1] != self.num_layers:
            raise QuantizeError(f"error stats over {self.num_layers} layers: got blocks {tuple(x.shape)} and {tuple(x_hat.shape)}")
        counts = clipped.sum(dim=(0, 2, 3)) if clipped is not None else None
        for k in range(self.num_layers):
            self.update_layer(k, x[:, k], x_hat[:, k], None if counts is None else counts[k])

    def update_layer(self, k: int, x: Tensor, x_hat: Tensor, clips: Tensor | int | None = None,
                     valid: Tensor | None = None) -> None:
        """`update` for stored layer k alone: x, x_hat [B, T, D] and its count of clipped values (a tensor on any
        device, or an int). `valid` [B] bool marks the samples that count (the others are zero, not stored values:
        images extraction skipped); None: all. Tensor ops only: nothing here waits for x's device."""
        if x.shape != x_hat.shape or x.ndim != 3 or not 0 <= k < self.num_layers:
            raise QuantizeError(f"error stats of layer {k} of {self.num_layers}: got blocks {tuple(x.shape)} and {tuple(x_hat.shape)}")
        xk, hk = x.to(torch.float32, copy=True), x_hat.float()  # [B, T, D]; xk becomes the error below
        norm = torch.linalg.vector_norm(xk, dim=-1).double()  # [B, T]
        cos = (xk * hk).sum(-1).double() / (norm * torch.linalg.vector_norm(hk, dim=-1).double()).clamp_min(1e-300)
        err = xk.sub_(hk)
        live = norm > 0
        add = {
            "sq_err": torch.linalg.vector_norm(err, dim=-1).double().square().sum(),
            "sq_ref": norm.square().sum(),
            "cos_sum": torch.where(live, cos, 0.0).sum(),
            "tokens": live.sum(),
        }
        if clips is not None:
            add["clips"] = torch.as_tensor(clips)
        for name, v in add.items():
            getattr(self, name)[k] += v.to(self.device, torch.float64)
        if err.numel():
            self.max_abs[k] = torch.fmax(self.max_abs[k], err.abs_().amax().to(self.device, torch.float64))  # a nan error is skipped
        if valid is None:
            self.values[k] += float(x.numel())
        else:
            self.values[k] += valid.sum().to(self.device, torch.float64) * float(x.shape[1] * x.shape[2])

    def host(self) -> "ErrorStats":
        """These sums on the CPU (itself when they are there already)."""
        if self.device.type == "cpu":
            return self
        out = ErrorStats(self.num_layers)
        for name in self.FIELDS:
            setattr(out, name, getattr(self, name).cpu())
        return out

    def merge(self, other: "ErrorStats") -> None:
        """Add the sums of `other` (another shard's or rank's blocks of the same layers)."""
        if other.num_layers != self.num_layers:
            raise QuantizeError(f"error stats over {self.num_layers} layers cannot merge stats over {other.num_layers}")
        for name in self.FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name).to(self.device)
            setattr(self, name, torch.maximum(mine, theirs) if name == "max_abs" else mine + theirs)

    def to_json(self) -> dict[str, list[float]]:
        """The sums, as stored in a shard marker."""
        return {name: getattr(self, name).tolist() for name in self.FIELDS}  # one sync per field, on the host

    @classmethod
    def from_json(cls, data: dict[str, list[float]]) -> "ErrorStats":
        stats = cls(len(data["values"]))
        for name in cls.FIELDS:
            setattr(stats, name, torch.tensor(data[name], dtype=torch.float64))
        return stats

    def per_layer(self) -> list[LayerError]:
        s = self.host()
        rel = torch.where(s.sq_ref > 0, s.sq_err / s.sq_ref.clamp_min(1e-300), torch.where(s.sq_err > 0, float("inf"), 0.0)).sqrt()
        cos = torch.where(s.tokens > 0, s.cos_sum / s.tokens.clamp_min(1), 1.0)
        clip = s.clips / s.values.clamp_min(1)
        return [LayerError(float(rel[k]), float(s.max_abs[k]), float(cos[k]), float(clip[k])) for k in range(self.num_layers)]


def layer_errors(scheme: QuantScheme, x: Tensor) -> list[LayerError]:
    """The error of storing the block x [B, K, T, D] with `scheme`, per layer (K entries)."""
    stats = ErrorStats(x.shape[1])
    stats.update(x, scheme.dequantize(scheme.quantize(x)), scheme.clipped(x))
    return stats.per_layer()
