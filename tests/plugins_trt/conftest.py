"""One CMake build folder per session for the kernel and plugin tests, through the build driver (plugins_trt/build.py),
configured for sm_80 only to keep the compiles short (`make kernel` builds 80;90 + PTX)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from layerfuse.plugins_trt import build as msda_build

TEST_ARCHS = "80"
# What a machine may lack, with the test then skipped (CMake's reason in the message): everything else must build.
SKIPPABLE = ("nvcc", "CUDA headers", "TensorRT headers")


def skip_if_missing(err: msda_build.BuildError) -> None:
    """pytest.skip when the build failed for want of nvcc, CUDA headers or TensorRT headers; else return."""
    if err.missing is not None and err.missing.startswith(SKIPPABLE):
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def msda_build_dir(tmp_path_factory) -> Path:
    """A build folder configured for TEST_ARCHS (builds without archs keep them unless LAYERFUSE_CUDA_ARCHS is set)."""
    build_dir = tmp_path_factory.mktemp("msda_build")
    msda_build.configure(build_dir, TEST_ARCHS)
    return build_dir


@pytest.fixture(scope="session")
def msda_targets(msda_build_dir) -> Callable[..., msda_build.Configuration]:
    """msda_targets("msda_kernel", ...): build them in the session folder, or skip if a tool/header is missing."""

    def build(*targets: str) -> msda_build.Configuration:
        try:
            return msda_build.build(list(targets), msda_build_dir, TEST_ARCHS)
        except msda_build.BuildError as err:
            skip_if_missing(err)
            raise

    return build
