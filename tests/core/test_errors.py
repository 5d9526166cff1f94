"""One error hierarchy: every exception class of the project is a LayerfuseError (core/errors.py), under one kind."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

from layerfuse.core.errors import CheckError, ConfigError, InputError, LayerfuseError, MissingError, StateError, ToolchainError
from layerfuse.export.verify import OnnxMismatchError
from layerfuse.pipeline.data.conversation import SkipSample

PACKAGES = ("layerfuse.core", "layerfuse.fusion", "layerfuse.plugins_trt", "layerfuse.export", "layerfuse.pipeline")
KINDS = (ConfigError, InputError, MissingError, StateError, ToolchainError, CheckError)
# Exceptions that are deliberately not LayerfuseErrors (documented in core/errors.py's docstring).
OUTSIDE = {
    "layerfuse.pipeline.data.conversation.SkipSample",  # a control-flow signal the loader catches
    "layerfuse.pipeline.cli.UserError",  # click's form of a LayerfuseError (the one line the CLI prints)
}
KNOWN = {  # the classes the walk must find (so that it cannot pass by finding nothing)
    "CheckpointError", "TrainError", "ExtractError", "CacheError", "DefaultVisionError", "SampleError", "TemplateError",
    "ReportError", "AblateError", "SweepError", "LayerSpecError", "FuserBuildError", "OnnxMismatchError", "OnnxExportError",
    "TensorRTUnavailable", "EngineBuildError", "HFExportError", "BuildError", "MSDAKernelError",
}


def _project_exceptions() -> tuple[dict[str, type[BaseException]], list[str]]:
    """Qualified name -> class for every exception class defined in the project; modules that need an optional
    package that is not installed here are returned by name (checked with ast instead)."""
    found: dict[str, type[BaseException]] = {}
    not_importable = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as e:
                if (e.name or "").startswith("layerfuse"):
                    raise
                not_importable.append(info.name)  # e.g. plugins_trt.trt_python_plugin without tensorrt
                continue
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == info.name:
                    found[f"{info.name}.{cls.__qualname__}"] = cls
    return found, not_importable


def test_every_project_exception_is_a_layerfuse_error() -> None:
    found, _ = _project_exceptions()
    assert KNOWN <= {name.rsplit(".", 1)[1] for name in found}, "the walk missed a known error class"
    stray = sorted(name for name, cls in found.items() if not issubclass(cls, LayerfuseError) and name not in OUTSIDE)
    assert not stray, f"derive these from a kind in core/errors.py (or document them in OUTSIDE): {stray}"
    assert all(name in found for name in OUTSIDE), "an allow-listed exception no longer exists: drop it from OUTSIDE"


def test_every_layerfuse_error_has_exactly_one_kind() -> None:
    found, _ = _project_exceptions()
    for name, cls in found.items():
        if issubclass(cls, LayerfuseError) and cls not in (LayerfuseError, *KINDS):
            kinds = [k for k in KINDS if issubclass(cls, k)]
            assert len(kinds) == 1, f"{name} is under {kinds}; put it under one kind"


def test_modules_that_cannot_be_imported_here_define_no_exception() -> None:
    _, not_importable = _project_exceptions()
    for name in not_importable:
        spec = importlib.util.find_spec(name)
        tree = ast.parse(Path(spec.origin).read_text())
        classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                   and any(ast.unparse(b).endswith(("Error", "Exception")) for b in n.bases)]
        assert not classes, f"{name} defines {classes}, which this test cannot import to check"


@pytest.mark.parametrize("kind, builtin", [(ConfigError, ValueError), (InputError, ValueError), (MissingError, FileNotFoundError),
                                           (StateError, RuntimeError), (ToolchainError, RuntimeError), (CheckError, RuntimeError)])
def test_kinds_keep_the_builtin_callers_catch(kind: type[LayerfuseError], builtin: type[Exception]) -> None:
    err = kind("the message")
    assert isinstance(err, builtin) and isinstance(err, LayerfuseError) and str(err) == "the message"


def test_a_mismatch_is_no_assertion() -> None:
    assert not issubclass(OnnxMismatchError, AssertionError) and issubclass(OnnxMismatchError, CheckError)


def test_control_flow_signal_stays_outside() -> None:
    assert not issubclass(SkipSample, LayerfuseError) and issubclass(SkipSample, ValueError)
