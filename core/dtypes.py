"""The dtypes features are stored and computed in: one enum, the names every option, cache and run file uses.

    name       torch dtype      zarr/numpy dtype stored
    float16    torch.float16    float16
    bfloat16   torch.bfloat16   uint16 (the bf16 bit patterns; zarr v3 core has no bfloat16, docs/cache-format.md)
    float32    torch.float32    float32
    int8       (quantised)      int8 + a float16 scale per (layer, token) + float16 outlier channels (cache only)
    float8_e4m3fn (quantised)   uint8 (the float8 bit patterns) + a float16 scale per (layer, token) (cache only)

The two quantised names are storage dtypes only (a cache's features, docs/cache-format.md section 3.5): readers
return them dequantised as float16 (`read_dtype`), and no model computes in them.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch

from layerfuse.core.errors import ConfigError


class StorageDtype(str, Enum):
    """A feature dtype by name; `StorageDtype("bfloat16")` reads a name, `str(d)` and `d.value` give it back."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    INT8 = "int8"
    FLOAT8 = "float8_e4m3fn"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every name, in declaration order (what click choices and error messages list)."""
        return tuple(d.value for d in cls)

    @classmethod
    def parse(cls, name: str, option: str = "dtype") -> "StorageDtype":
        """`name` as a StorageDtype; a ConfigError (a ValueError) naming `option` and the known names otherwise."""
        try:
            return cls(name)
        except ValueError:
            raise ConfigError(f"{option} must be one of {', '.join(cls.names())}, not {name!r}") from None

    @classmethod
    def float_names(cls) -> tuple[str, ...]:
        """The names a model can compute in (every name but the quantised storage dtypes)."""
        return tuple(d.value for d in cls if not d.quantized)

    @property
    def quantized(self) -> bool:
        """Stored as 1-byte codes with scales beside them (pipeline/cache/encoding.py), read back as float16."""
        return self in (StorageDtype.INT8, StorageDtype.FLOAT8)

    @property
    def read_dtype(self) -> "StorageDtype":
        """The dtype readers return features in: the dtype itself, float16 for the quantised ones."""
        return StorageDtype.FLOAT16 if self.quantized else self

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored values (for int8: the codes; for float8_e4m3fn: the float8 values)."""
        return _TORCH[self]

    @property
    def zarr_dtype(self) -> np.dtype:
        """The numpy dtype of the stored zarr array (bfloat16: uint16 bit patterns)."""
        return np.dtype(_ZARR[self])

    @property
    def overflow(self) -> float:
        """The smallest |x| (float32 or narrower) this dtype does not store finite, rounding to nearest: 65520 for
        float16 (its largest value is 65504), (2 - 2^-8) x 2^127 for bfloat16, inf for float32 and for the quantised
        dtypes, which scale each token (a token beyond their float16 scales clips, and the clip is counted)."""
        return _OVERFLOW.get(self, float("inf"))

    @property
    def itemsize(self) -> int:
        return self.zarr_dtype.itemsize


_TORCH = {StorageDtype.FLOAT16: torch.float16, StorageDtype.BFLOAT16: torch.bfloat16, StorageDtype.FLOAT32: torch.float32,
          StorageDtype.INT8: torch.int8, StorageDtype.FLOAT8: torch.float8_e4m3fn}
_ZARR = {StorageDtype.FLOAT16: "float16", StorageDtype.BFLOAT16: "uint16", StorageDtype.FLOAT32: "float32",
         StorageDtype.INT8: "int8", StorageDtype.FLOAT8: "uint8"}
_OVERFLOW = {StorageDtype.FLOAT16: 65520.0, StorageDtype.BFLOAT16: (2 - 2**-8) * 2.0**127}
