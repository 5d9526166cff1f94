"""core/dtypes.py: the one list of storage dtypes, and everything that offers or stores them agrees with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerfuse.core.dtypes import StorageDtype
from layerfuse.pipeline.cache.extract import ExtractConfig, _compute_dtype
from layerfuse.pipeline.cache.encoding import from_torch, to_torch
from layerfuse.pipeline.cli import main


def test_names_and_conversions():
    assert StorageDtype.names() == ("float16", "bfloat16", "float32", "int8", "float8_e4m3fn")
    assert StorageDtype.float_names() == ("float16", "bfloat16", "float32")
    assert [d.torch_dtype for d in StorageDtype] == [torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn]
    assert [d.zarr_dtype for d in StorageDtype] == [np.dtype("float16"), np.dtype("uint16"), np.dtype("float32"), np.dtype("int8"),
                                                     np.dtype("uint8")]
    assert [d.itemsize for d in StorageDtype] == [2, 2, 4, 1, 1]
    assert [d.read_dtype.value for d in StorageDtype] == ["float16", "bfloat16", "float32", "float16", "float16"]
    assert StorageDtype("bfloat16") is StorageDtype.BFLOAT16 and str(StorageDtype.BFLOAT16) == "bfloat16"
    assert StorageDtype.FLOAT16 == "float16" and f"{StorageDtype.FLOAT32}" == "float32"


def test_parse_names_the_option_and_the_choices():
    assert StorageDtype.parse("float32") is StorageDtype.FLOAT32
    with pytest.raises(ValueError, match="--dtype must be one of float16, bfloat16, float32, int8, float8_e4m3fn, not 'fp8'"):
        StorageDtype.parse("fp8", "--dtype")


def _choices(command: str, option: str) -> list[str]:
    param = next(p for p in main.commands[command].params if p.name == option)
    return list(param.type.choices)


def test_cli_choices_are_the_enum():
    assert _choices("extract", "dtype") == list(StorageDtype.names())
    assert _choices("extract", "compute_dtype") == ["auto", *StorageDtype.float_names()]  # no model computes in int8


@pytest.mark.parametrize("dtype", [d for d in StorageDtype if not d.quantized])
def test_the_cache_stores_each_dtype_as_its_zarr_dtype_and_reads_it_back(dtype):
    x = torch.randn(2, 3, 5)
    stored = from_torch(x, dtype.value)
    assert stored.dtype == dtype.zarr_dtype
    back = to_torch(stored, dtype.value)
    assert back.dtype == dtype.torch_dtype and torch.equal(back, x.to(dtype.torch_dtype))


def test_extract_defaults_and_compute_dtypes_come_from_the_enum():
    assert ExtractConfig.__dataclass_fields__["dtype"].default in StorageDtype.names()
    cpu = torch.device("cpu")
    assert [_compute_dtype(name, cpu) for name in _choices("extract", "compute_dtype")] == [
        torch.float32, *(StorageDtype(d).torch_dtype for d in StorageDtype.float_names())]  # auto is float32 on the CPU


def test_no_encoder_computes_in_a_quantised_dtype():
    from layerfuse.pipeline.cache.extract import ExtractError

    for name in ("int8", "float8_e4m3fn"):
        with pytest.raises(ExtractError, match="--compute-dtype must be auto or one of float16, bfloat16, float32"):
            _compute_dtype(name, torch.device("cpu"))
