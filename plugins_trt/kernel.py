"""The MSDeformAttn kernel from Python: ctypes bindings of the C ABI (csrc/msda_api.h), an autograd Function, and
`register()`, which plugs it into `layerfuse.fusion.msda.ms_deform_attn` (impl="kernel", and "auto" on CUDA).

    from layerfuse.plugins_trt import kernel
    kernel.register()                      # builds libmsda_kernel.so (build.py: CMake + nvcc), needs a CUDA device
    ms_deform_attn(value, shapes, starts, loc, attn)          # CUDA tensors -> the kernel

`register(host=True)` also binds the CPU build of the same arithmetic (libmsda_host.so) for CPU tensors: slow, for
testing the kernel's math and this wrapper where no GPU exists. LAYERFUSE_MSDA_LIB / LAYERFUSE_MSDA_HOST_LIB point at
prebuilt libraries instead of building.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import torch

from layerfuse.core.errors import ToolchainError
from layerfuse.fusion.msda import ms_deform_attn_grid_sample, register_kernel, unregister_kernel

from . import build as msda_build

VALUE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # MSDA_FLOAT32 / FLOAT16 / BFLOAT16
INDEX_DTYPES = {torch.int32: 0, torch.int64: 1}  # MSDA_INT32 / MSDA_INT64
ABI_VERSION = 1

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


class MSDAKernelError(ToolchainError):
    """The library could not be built or loaded, or a launcher returned an error status."""


class MSDALibrary:
    """ctypes binding of msda_forward / msda_backward (suffix "") or their host builds (suffix "_host")."""

    def __init__(self, path: Path, suffix: str = "") -> None:
        self.path = Path(path)
        self.suffix = suffix
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as err:
            raise MSDAKernelError(f"cannot load {self.path}: {err}") from err
        lib = self.lib
        lib.msda_abi_version.restype = ctypes.c_int
        if lib.msda_abi_version() != ABI_VERSION:
            raise MSDAKernelError(f"{self.path} has ABI version {lib.msda_abi_version()}, expected {ABI_VERSION}: rebuild it")
        lib.msda_status_string.restype = ctypes.c_char_p
        lib.msda_status_string.argtypes = [ctypes.c_int]
        lib.msda_last_error.restype = ctypes.c_char_p
        lib.msda_backward_workspace_size.restype = ctypes.c_size_t
        lib.msda_backward_workspace_size.argtypes = [_I64, _I64, _I64, _I64, ctypes.c_int]
        self._forward = getattr(lib, "msda_forward" + suffix)
        self._forward.restype = ctypes.c_int
        self._forward.argtypes = [_PTR] * 6 + [_I64] * 7 + [ctypes.c_int, ctypes.c_int, _PTR]
        self._backward = getattr(lib, "msda_backward" + suffix)
        self._backward.restype = ctypes.c_int
        self._backward.argtypes = [_PTR] * 10 + [_I64] * 7 + [ctypes.c_int, ctypes.c_int, _PTR]

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            reason = self.lib.msda_status_string(status).decode()
            detail = self.lib.msda_last_error().decode()
            raise MSDAKernelError(f"{what}{self.suffix} failed: {reason}: {detail}")

    def forward(self, value, spatial_shapes, level_start_index, loc, attn, out, stream: int = 0) -> None:
        """value [B,S,H,Dh], shapes [L,2], starts [L], loc [B,Q,H,L,P,2] fp32, attn [B,Q,H,L,P] fp32 -> out [B,Q,H*Dh]."""
        b, s, h, dh = value.shape
        q, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
        pointers = (value.data_ptr(), spatial_shapes.data_ptr(), level_start_index.data_ptr(), loc.data_ptr(),
                    attn.data_ptr(), out.data_ptr())
        self.forward_pointers(pointers, (b, s, h, dh, q, n_levels, n_points), VALUE_DTYPES[value.dtype],
                              INDEX_DTYPES[spatial_shapes.dtype], stream)

    def forward_pointers(self, pointers: tuple[int, ...], sizes: tuple[int, ...], value_dtype: int, index_dtype: int,
                         stream: int = 0) -> None:
        """msda_forward on raw addresses (value, shapes, starts, loc, attn, out) and sizes (B, S, H, Dh, Q, L, P)."""
        self._check(self._forward(*pointers, *sizes, value_dtype, index_dtype, stream), "msda_forward")

    def workspace_bytes(self, value: torch.Tensor) -> int:
        b, s, h, dh = value.shape
        return int(self.lib.msda_backward_workspace_size(b, s, h, dh, VALUE_DTYPES[value.dtype]))

    def backward(self, value, spatial_shapes, level_start_index, loc, attn, grad_out, grad_value, grad_loc, grad_attn,
                 workspace: torch.Tensor | None, stream: int = 0) -> None:
        """Overwrites grad_value [B,S,H,Dh], grad_loc [B,Q,H,L,P,2] fp32 and grad_attn [B,Q,H,L,P] fp32."""
        b, s, h, dh = value.shape
        q, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
        status = self._backward(
            value.data_ptr(), spatial_shapes.data_ptr(), level_start_index.data_ptr(), loc.data_ptr(),
            attn.data_ptr(), grad_out.data_ptr(), grad_value.data_ptr(), grad_loc.data_ptr(), grad_attn.data_ptr(),
            workspace.data_ptr() if workspace is not None else None, b, s, h, dh, q, n_levels, n_points,
            VALUE_DTYPES[value.dtype], INDEX_DTYPES[spatial_shapes.dtype], stream,
        )
        self._check(status, "msda_backward")


_LIBS: dict[str, MSDALibrary] = {}  # "cuda" -> libmsda_kernel, "cpu" -> libmsda_host


def _library_path(env: str, target: str, build: bool, build_dir: Path | None, archs: str | None = None) -> Path:
    """The library named by `env`, else the CMake target's library in build_dir: brought up to date through the
    build driver (CMake + Ninja: nothing is recompiled when the sources are unchanged) when build=True."""
    if os.environ.get(env):
        path = Path(os.environ[env])
        if not path.is_file():
            raise MSDAKernelError(f"{env}={path} does not exist")
        return path
    build_dir = Path(build_dir) if build_dir else msda_build.DEFAULT_BUILD_DIR
    if not build:
        path = build_dir / msda_build.LIBRARIES[target]
        if not path.is_file():
            raise MSDAKernelError(f"{path} is not built: run `make kernel` or `python -m layerfuse.plugins_trt.build`")
        return path
    try:
        return msda_build.build([target], build_dir, archs).output(target)
    except msda_build.BuildError as err:
        raise MSDAKernelError(str(err)) from err


def load_kernel_library(build: bool = True, archs: str | None = None, build_dir: Path | None = None) -> MSDALibrary:
    """libmsda_kernel.so (built, or brought up to date, unless build=False)."""
    return MSDALibrary(_library_path("LAYERFUSE_MSDA_LIB", "msda_kernel", build, build_dir, archs))


def load_host_library(build: bool = True, build_dir: Path | None = None) -> MSDALibrary:
    """libmsda_host.so, the CPU build of the kernel arithmetic."""
    return MSDALibrary(_library_path("LAYERFUSE_MSDA_HOST_LIB", "msda_host", build, build_dir), suffix="_host")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class MSDAFunction(torch.autograd.Function):
    """MSDeformAttn forward/backward through an MSDALibrary; gradients for value, locations and weights."""

    @staticmethod
    def forward(ctx, lib: MSDALibrary, value, spatial_shapes, level_start_index, loc, attn):  # -> [B, Q, H*Dh]
        value, loc, attn = value.contiguous(), loc.contiguous(), attn.contiguous()
        b, _, h, dh = value.shape
        out = torch.empty(b, loc.shape[1], h * dh, dtype=value.dtype, device=value.device)
        with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():
            lib.forward(value, spatial_shapes, level_start_index, loc, attn, out, _stream(value.device))
        ctx.lib = lib
        ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, attn)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        lib: MSDALibrary = ctx.lib
        grad_out = grad_out.to(value.dtype).contiguous()
        grad_value = torch.empty_like(value)
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        ws_bytes = lib.workspace_bytes(value)
        workspace = torch.empty(ws_bytes // 4, dtype=torch.float32, device=value.device) if ws_bytes else None
        with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():
            lib.backward(value, spatial_shapes, level_start_index, loc, attn, grad_out, grad_value, grad_loc,
                         grad_attn, workspace, _stream(value.device))
        return None, grad_value, None, None, grad_loc, grad_attn


def ms_deform_attn_kernel(
    value: torch.Tensor,  # [B, S, H, Dh] fp32 / fp16 / bf16
    spatial_shapes: torch.Tensor,  # [L, 2] int32 / int64
    level_start_index: torch.Tensor,  # [L]
    sampling_locations: torch.Tensor,  # [B, Q, H, L, P, 2]
    attention_weights: torch.Tensor,  # [B, Q, H, L, P]
) -> torch.Tensor:  # [B, Q, H*Dh] in value's dtype
    """The registered implementation: the CUDA kernel for CUDA tensors (the host build for CPU ones if bound).

    float64 value (gradcheck, references) goes to the grid_sample implementation, so that impl="auto" keeps
    working for it on CUDA once the kernel is registered; other dtypes are refused."""
    if value.dtype == torch.float64:
        return ms_deform_attn_grid_sample(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights)
    if value.dtype not in VALUE_DTYPES:
        raise TypeError(f"ms_deform_attn kernel: value must be float32, float16 or bfloat16 (float64 goes to "
                        f"grid_sample), got {value.dtype}")
    key = "cuda" if value.is_cuda else "cpu"
    lib = _LIBS.get(key)
    if lib is None:
        raise MSDAKernelError(
            f"ms_deform_attn kernel: no library bound for {value.device} tensors; the CUDA kernel needs CUDA tensors "
            "(call layerfuse.plugins_trt.kernel.register(), or register(host=True) for the CPU test build)"
        )
    device = value.device
    index_dtype = spatial_shapes.dtype if spatial_shapes.dtype in INDEX_DTYPES else torch.int64
    spatial_shapes = spatial_shapes.to(device=device, dtype=index_dtype).contiguous()
    level_start_index = level_start_index.to(device=device, dtype=index_dtype).contiguous()
    loc = sampling_locations.to(device=device, dtype=torch.float32)
    attn = attention_weights.to(device=device, dtype=torch.float32)
    return MSDAFunction.apply(lib, value, spatial_shapes, level_start_index, loc, attn)


def register(build: bool = True, host: bool = False, archs: str | None = None) -> None:
    """Load the kernel library (building it if needed) and register it with `ms_deform_attn`.

    Needs a CUDA device, unless host=True, which binds the CPU build for CPU tensors (and the CUDA kernel too when a
    device exists)."""
    if host:
        _LIBS["cpu"] = load_host_library(build)
    if torch.cuda.is_available():
        _LIBS["cuda"] = load_kernel_library(build, archs)
    elif not host:
        raise MSDAKernelError("no CUDA device (torch.cuda.is_available() is False): the MSDeformAttn CUDA kernel needs "
                              "a GPU; use impl='grid_sample' or 'gather' on CPU")
    register_kernel(ms_deform_attn_kernel)


def unregister() -> None:
    """Drop the bound libraries and the registration."""
    _LIBS.clear()
    unregister_kernel()


def bound_library(device: str | torch.device) -> MSDALibrary:
    """The library bound by register() for this device type ("cuda" or "cpu")."""
    key = torch.device(device).type
    if key not in _LIBS:
        raise MSDAKernelError(f"no MSDeformAttn library bound for {key}: call register() first")
    return _LIBS[key]
