"""How a cache stores its features: plain floats, or 1-byte codes with scales beside them (docs/cache-format.md 3.2).

    enc = FeatureEncoding.calibrate("int8", absmax)        # extraction: absmax [K, D] of the first images' blocks
    absmax, valid = enc.check(x)                            # extraction: which samples store finite
    parts = enc.encode(x, stats, valid)                     # x [B, K, T, D] on the extraction device -> host numpy parts
    why = enc.refusals(absmax, valid, names)                # after the copies: why the refused are not stored
    x_hat = enc.decode(parts)                               # a reader (loader worker): parts -> float16 [B, K, T, D]
    enc = FeatureEncoding.from_storage(meta["storage"])     # what the cache's metadata says

A cache's parts, by array path (K = stored hidden states + group-mean views):

    features        [N, K, T, D]  float16 | bfloat16 (uint16 bit patterns) | float32, or
                                  int8 codes (--dtype int8), or float8_e4m3fn bit patterns as uint8 (--dtype float8_e4m3fn)
    quant/scale     [N, K, T]     float16, one per (sample, layer, token)                   quantised dtypes only
    quant/outliers  [N, K, T, n]  float16, the n outlier channels of each token, kept exact  int8 with n > 0 only

int8 is `token+outliers` of pipeline/cache/quantize.py: per layer, the n channels whose absmax over the calibration
images exceeds 2x the layer's median channel absmax (n at most 16, the same n for every layer, each layer's n largest)
are stored in float16; the rest of each token is symmetric int8 with the token's absmax / 127 as its float16 scale.
float8_e4m3fn is `fp8+token`: each token divided by its absmax / 448, cast to float8. BENCHMARKS.md "Quantised
storage" has the measurements behind the choice (all-MiniLM-L6-v2 hidden states: worst layer 0.97% relative RMS for
int8, 2.6% for float8; per-channel scales 4.5% and clipping on unseen text). Readers return float16.

Quantising happens on the device that ran the encoder, before the copy to the host (a quarter of the bytes move), one
stored layer at a time (float32 temporaries of [B, 1, T, D]: at ViT-L/14-336 a batch of 32 is 76 MB per temporary, not
1.9 GB);
`ErrorStats` of every block (relative RMS, largest absolute error, token cosine, clip rate per stored layer) is summed
in the shard markers and recorded in the metadata (`storage.quant.errors`, shown by `layerfuse cache info`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from layerfuse.core.dtypes import StorageDtype
from layerfuse.pipeline.cache.quantize import ErrorStats, Float8Token, QuantScheme, TokenOutlierInt8

FEATURES = "features"
SCALE = "quant/scale"
OUTLIERS = "quant/outliers"
QUANT_KEY = "quant"  # storage.quant in the metadata
PART_KEYS = {FEATURES: "q", SCALE: "scale", OUTLIERS: "outliers"}  # stored part -> the scheme's part (quantize.Parts)

CALIBRATION_IMAGES = 32  # the first images (in storage order) whose absmax chooses the int8 outlier channels
OUTLIER_FACTOR = 2.0  # an outlier channel's absmax exceeds this many times its layer's median channel absmax
MAX_OUTLIERS = 16  # at most this many channels per layer kept in float16

SCHEME_OF = {StorageDtype.INT8: TokenOutlierInt8.name, StorageDtype.FLOAT8: Float8Token.name}


def to_torch(a: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """A stored float feature array as a torch tensor of its dtype (bf16 bit patterns re-viewed)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if StorageDtype(storage_dtype) is StorageDtype.BFLOAT16 else t


def from_torch(t: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """A float feature tensor as the numpy array that is stored (bf16 as its uint16 bit pattern)."""
    dtype = StorageDtype(storage_dtype)
    if dtype.quantized:
        raise ValueError(f"{dtype} features are stored as parts: use FeatureEncoding.encode")
    t = t.detach().to("cpu", dtype.torch_dtype).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype is StorageDtype.BFLOAT16 else t.numpy()


def host_tensor(a: np.ndarray, dtype: StorageDtype) -> Tensor:
    """The torch view of a stored features array (bf16 held as uint16, float8 bits as uint8) in `dtype`'s torch dtype."""
    t = torch.from_numpy(a)
    return t if t.dtype == dtype.torch_dtype else t.view(dtype.torch_dtype)


def running_absmax(absmax: Tensor | None, x: Tensor) -> Tensor:
    """absmax [K, D] float32 updated with a block x [B, K, T, D] (the calibration statistic of `calibrate`)."""
    m = x.detach().float().abs().amax(dim=(0, 2))
    return m if absmax is None else torch.maximum(absmax, m.to(absmax.device))


@dataclass(frozen=True)
class FeatureEncoding:
    """The stored form of a cache's features: the dtype, and for the quantised dtypes the calibrated scheme."""

    dtype: StorageDtype
    scheme: QuantScheme | None = None  # None for float dtypes

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, dtype: str, absmax: Tensor | None, inputs: int) -> "FeatureEncoding":
        """The encoding of `dtype` for `inputs` (K) stored hidden states and views; int8 chooses its outlier channels
        from absmax [K, D] over the calibration images (None when the source has no readable image: no channel kept)."""
        d = StorageDtype(dtype)
        if d is StorageDtype.INT8:
            if absmax is None:
                return cls(d, TokenOutlierInt8(torch.zeros(inputs, 0, dtype=torch.long)))
            block = absmax.float().cpu()[None, :, None, :]  # [1, K, 1, D]: absmax over (samples, tokens) is itself
            return cls(d, TokenOutlierInt8.calibrate(block, factor=OUTLIER_FACTOR, max_outliers=MAX_OUTLIERS))
        if d is StorageDtype.FLOAT8:
            return cls(d, Float8Token())
        return cls(d)

    @classmethod
    def from_storage(cls, storage: Mapping[str, Any]) -> "FeatureEncoding":
        """The encoding a cache's `storage` metadata records."""
        d = StorageDtype(storage["dtype"])
        if not d.quantized:
            return cls(d)
        quant = storage[QUANT_KEY]
        if d is StorageDtype.INT8:
            return cls(d, TokenOutlierInt8(torch.tensor(quant["outlier_channels"], dtype=torch.long)))  # [K, n], n may be 0
        return cls(d, Float8Token())

    def storage_record(self, inputs: int) -> dict[str, Any]:
        """storage.quant for a cache with `inputs` stored hidden states + views (empty for float dtypes)."""
        if self.scheme is None:
            return {}
        rec: dict[str, Any] = {"scheme": self.scheme.name, "scale_dtype": "float16", "inputs": inputs}
        if isinstance(self.scheme, TokenOutlierInt8):
            rec.update(outlier_channels=self.channels.tolist(), outlier_factor=OUTLIER_FACTOR,
                       max_outliers=MAX_OUTLIERS, calibration_images=CALIBRATION_IMAGES)
        return {QUANT_KEY: rec}

    # --- layout -----------------------------------------------------------------------------------------------
    @property
    def channels(self) -> Tensor:
        """[K, n] outlier channels (int8), else [0, 0]."""
        return self.scheme.channels if isinstance(self.scheme, TokenOutlierInt8) else torch.zeros(0, 0, dtype=torch.long)

    @property
    def num_outliers(self) -> int:
        return int(self.channels.shape[1])

    def part_shapes(self, tokens: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """Per (sample, layer) shape of each stored part, by array path, in checksum order."""
        shapes: dict[str, tuple[int, ...]] = {FEATURES: (tokens, hidden)}
        if self.scheme is not None:
            shapes[SCALE] = (tokens,)
        if self.num_outliers:
            shapes[OUTLIERS] = (tokens, self.num_outliers)
        return shapes

    def part_dtypes(self) -> dict[str, np.dtype]:
        return {FEATURES: self.dtype.zarr_dtype, SCALE: np.dtype(np.float16), OUTLIERS: np.dtype(np.float16)}

    @property
    def read_dtype(self) -> str:
        """The dtype `decode` (and so every reader) returns."""
        return self.dtype.read_dtype.value

    # --- values -----------------------------------------------------------------------------------------------
    def check(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, K, T, D] -> absmax [B, K] float32 (nan where a value is nan), valid [B] bool: whether every value of
        a sample is finite and stored finite (`StorageDtype.overflow`: float16 holds |x| < 65520). For the quantised
        dtypes the rows not valid are zeroed in place (on a CPU only when there are some), so `encode_into(..., valid)`
        can skip its own tests; float rows are stored as they are, and the caller zeroes the rows it does not keep
        (`FeaturePool.blank`). Two fused reductions, with no host sync off the CPU; x must be writable when quantised
        (under inference mode for an inference tensor such as the encoder's output)."""
        absmax = torch.maximum(x.amax((2, 3)), x.amin((2, 3)).neg()).float()  # no |x| temporary; a nan propagates
        valid = (absmax < self.dtype.overflow).all(1)  # a nan compares False
        if self.scheme is not None and (x.device.type != "cpu" or not bool(valid.all())):
            x.masked_fill_(~valid[:, None, None, None], 0)
        return absmax, valid

    def refusal(self, absmax: np.ndarray, names: Sequence[str]) -> str | None:
        """Why a sample is not stored, from its absmax [K] (`check`) and the names of its K inputs, or None."""
        bad = np.flatnonzero(~(absmax < self.dtype.overflow))
        if not bad.size:
            return None
        more = f" and {bad.size - 1} more stored input(s)" if bad.size > 1 else ""
        if not np.isfinite(absmax[bad]).all():
            first = next(int(k) for k in bad if not np.isfinite(absmax[k]))
            return f"non-finite hidden states: nan or inf in {names[first]}{more} of the vision encoder's output"
        return (f"hidden states beyond {self.dtype}: |x| up to {float(absmax[bad].max()):.4g} in {names[int(bad[0])]}{more}, "
                f"and {self.dtype} stores |x| < {self.dtype.overflow:g} (--dtype bfloat16 or int8 stores them)")

    def refusals(self, absmax: Tensor, valid: Tensor, names: Sequence[str]) -> dict[int, str]:
        """{i: why} for the samples `check` refused (positions in x's batch), from its absmax [B, K] and valid [B]: one
        host read of `valid` (call it after the copies of the block, so that no wait is left on the device), then the
        `refusal` text of each refused sample only."""
        return {i: self.refusal(absmax[i].cpu().numpy(), names) for i in torch.nonzero(~valid).flatten().tolist()}

    def encode(self, x: Tensor, stats: ErrorStats | None = None, valid: Tensor | None = None) -> dict[str, np.ndarray]:
        """x [B, K, T, D] (any float dtype, on the extraction device) -> the stored parts on the host (new arrays).

        Quantised dtypes quantise where x is and add this block's error to `stats` (computed there too); `valid` as in
        `encode_into`."""
        dt = self.part_dtypes()
        out = {p: np.empty((x.shape[0], x.shape[1], *s), dt[p]) for p, s in self.part_shapes(x.shape[2], x.shape[3]).items()}
        self.encode_into(x, out, stats, valid)
        return out

    def encode_rows(self, x: Tensor, out: Mapping[str, np.ndarray], rows: np.ndarray, stats: ErrorStats | None = None,
                    valid: Tensor | None = None) -> None:
        """`encode_into` of x [B, ...] into rows `rows` [B] of out[part] ([N, ...] each, e.g. a shard buffer): one
        converting copy per run of consecutive rows."""
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        for a, b in zip([0, *breaks], [*breaks, len(rows)]):
            r0, r1 = int(rows[a]), int(rows[b - 1]) + 1
            self.encode_into(x[a:b], {p: v[r0:r1] for p, v in out.items()}, stats, None if valid is None else valid[a:b])

    def encode_into(self, x: Tensor, out: Mapping[str, np.ndarray], stats: ErrorStats | None = None,
                    valid: Tensor | None = None) -> None:
        """`encode`, written into out[part] ([B, K, ...] host arrays, e.g. rows of an extraction shard buffer): one
        converting copy per part from x's device straight into place (no intermediate host array: at ViT-L/14-336 a
        batch of 18 is 531 MB of fp16, and each extra host copy of it cost 70 ms per image in fresh pages).

        Quantised dtypes go one stored layer at a time (float32 temporaries of [B, 1, T, D], not [B, K, T, D]). On a
        CPU each layer's parts are written into `out` directly; elsewhere into device buffers of out's shape, copied
        to the host once per part: a layer of `out` is a strided view, and a strided copy from a GPU goes through a
        pageable temporary, where the whole block is one copy into pinned memory.

        `valid` [B] bool (on x's device) is the caller's `check` of x (which zeroed the other rows of a quantised x):
        the error sums then count the valid rows only, and the schemes skip their own finiteness test (off the CPU a
        host sync per stored layer)."""
        host = {p: host_tensor(a, self.dtype) if p == FEATURES else torch.from_numpy(a) for p, a in out.items()}
        if self.scheme is None:
            host[FEATURES].copy_(x)
            return
        staged = host if x.device.type == "cpu" else {p: torch.empty(t.shape, dtype=t.dtype, device=x.device) for p, t in host.items()}
        self.quantize_into(x, staged, stats, valid)
        if staged is not host:
            for p, t in host.items():
                t.copy_(staged[p])

    def quantize_into(self, x: Tensor, out: Mapping[str, Tensor], stats: ErrorStats | None = None,
                      valid: Tensor | None = None) -> None:
        """The quantised parts of x [B, K, T, D] written into the tensors out[part] ([B, K, ...], on any device), one
        stored layer at a time, its error added to `stats` (`valid`: as in `encode_into`). With `valid` given, nothing
        here waits for x's device; without it each layer's finiteness test does."""
        for k in range(x.shape[1]):
            scheme, xk = self.scheme.layer(k), x[:, k : k + 1]
            parts = scheme.quantize(xk, checked=valid is not None)  # float32 inside, on x's device
            if stats is not None:
                stats.update_layer(k, xk[:, 0], scheme.dequantize(parts)[:, 0], scheme.clip_counts(xk, parts)[0], valid)
            for p, t in out.items():
                t[:, k : k + 1].copy_(parts[PART_KEYS[p]])

    def decode(self, parts: Mapping[str, np.ndarray], positions: Sequence[int] | np.ndarray | None = None) -> Tensor:
        """The stored parts [B, k, ...] (numpy) of the stored layers/views at `positions` (None: all K, in order) ->
        features [B, k, T, D] in `read_dtype` (float16 when quantised)."""
        if self.scheme is None:
            return to_torch(parts[FEATURES], self.dtype.value)
        scheme = self.scheme
        if isinstance(scheme, TokenOutlierInt8) and positions is not None:
            scheme = TokenOutlierInt8(scheme.channels[torch.as_tensor(np.asarray(positions, np.int64))])
        q = torch.from_numpy(np.ascontiguousarray(parts[FEATURES]))
        tparts = {"q": q.view(torch.float8_e4m3fn) if self.dtype is StorageDtype.FLOAT8 else q,
                  "scale": torch.from_numpy(np.ascontiguousarray(parts[SCALE]))}
        if self.num_outliers:
            tparts["outliers"] = torch.from_numpy(np.ascontiguousarray(parts[OUTLIERS]))
        elif isinstance(scheme, TokenOutlierInt8):
            tparts["outliers"] = torch.zeros(*q.shape[:3], 0, dtype=torch.float16)
        return scheme.dequantize(tparts, torch.float16)

    def zeros(self, n: int, inputs: int, tokens: int, hidden: int) -> dict[str, np.ndarray]:
        """Parts of n all-zero rows (rows without an image): [n, inputs, ...] per part."""
        dt = self.part_dtypes()
        return {p: np.zeros((n, inputs, *s), dt[p]) for p, s in self.part_shapes(tokens, hidden).items()}
