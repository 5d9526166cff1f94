"""The dtypes features are stored and computed in: one enum, the names every option, cache and run file uses.

    name       torch dtype      zarr/numpy dtype stored
    float16    torch.float16    float16
    bfloat16   torch.bfloat16   uint16 (the bf16 bit patterns; zarr v3 core has no bfloat16, docs/cache-format.md)
    float32    torch.float32    float32
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

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self]

    @property
    def zarr_dtype(self) -> np.dtype:
        """The numpy dtype of the stored zarr array (bfloat16: uint16 bit patterns)."""
        return np.dtype(_ZARR[self])

    @property
    def itemsize(self) -> int:
        return self.zarr_dtype.itemsize


_TORCH = {StorageDtype.FLOAT16: torch.float16, StorageDtype.BFLOAT16: torch.bfloat16, StorageDtype.FLOAT32: torch.float32}
_ZARR = {StorageDtype.FLOAT16: "float16", StorageDtype.BFLOAT16: "uint16", StorageDtype.FLOAT32: "float32"}
