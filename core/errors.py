"""The errors a user can fix: one base, a few kinds, each project error class under one kind.

`layerfuse <command>` prints any `LayerfuseError` as one line (`layerfuse <command>: <message>`) and exits
non-zero; every other exception is a bug and keeps its traceback. A message names the option, sample, file
or folder at fault and, where there is one, what to do. Each kind also derives from the builtin that its
classes derived from before this hierarchy existed, so `except ValueError` / `except FileNotFoundError` /
`except RuntimeError` callers keep working.

    LayerfuseError(Exception)
    ├── ConfigError(ValueError)            an option, spec, template or model config that cannot be used as given
    │   ├── fusion.layers.LayerSpecError
    │   ├── fusion.base.FuserBuildError
    │   ├── pipeline.data.conversation.TemplateError
    │   ├── pipeline.ablation.sweep.SweepError
    │   ├── export.frontend.OnnxExportError
    │   └── export.hf_model.HFExportError
    ├── InputError(ValueError)             input data that cannot be used: a sample, an image, a dataset file
    │   ├── pipeline.data.records.SampleError
    │   └── pipeline.cache.quantize.QuantizeError
    ├── MissingError(FileNotFoundError)    a file or folder that was named is not there (raised as it is:
    │                                      shards, run folders, ONNX files, plugin libraries, ...)
    ├── StateError(RuntimeError)           what exists cannot serve the request: a cache, run, sweep folder or
    │   │                                  checkpoint that is incomplete, of other settings, or cannot be loaded
    │   ├── core.hub.CheckpointError
    │   ├── pipeline.models.default_vision.DefaultVisionError
    │   ├── pipeline.cache.reader.CacheError
    │   ├── pipeline.cache.extract.ExtractError
    │   ├── pipeline.data.stream.SpoolError
    │   ├── pipeline.training.train.TrainError
    │   ├── pipeline.ablation.run.AblateError
    │   └── pipeline.ablation.results.ReportError
    ├── ToolchainError(RuntimeError)       this machine lacks a compiler, GPU or TensorRT, or a native build/launch failed
    │   ├── plugins_trt.build.BuildError
    │   ├── plugins_trt.kernel.MSDAKernelError
    │   ├── export.engine.TensorRTUnavailable
    │   └── export.engine.EngineBuildError
    └── CheckError(RuntimeError)           a produced artefact failed its correctness check
        └── export.verify.OnnxMismatchError

Outside the hierarchy on purpose: `pipeline.data.conversation.SkipSample` is a control-flow signal (the loader and
the evaluator count the sample as skipped and move on); one that escapes is a bug, so it keeps its traceback.
`pipeline.cli.UserError` is the click exception a LayerfuseError becomes in the CLI.
"""

from __future__ import annotations


class LayerfuseError(Exception):
    """An error the user can fix; the CLI shows its message as one line, without a traceback."""


class ConfigError(LayerfuseError, ValueError):
    """An option, spec, template or model configuration that cannot be used as given."""


class InputError(LayerfuseError, ValueError):
    """Input data that cannot be used: a sample, an image, a dataset or sweep file's contents."""


class MissingError(LayerfuseError, FileNotFoundError):
    """A file or folder that was named (on the command line, in a config or a run) is not there."""


class StateError(LayerfuseError, RuntimeError):
    """What exists cannot serve the request: an incomplete cache, a run or sweep folder of other settings,
    a checkpoint that cannot be loaded."""


class ToolchainError(LayerfuseError, RuntimeError):
    """This machine lacks a tool (compiler, GPU, TensorRT) or a native build or launch failed."""


class CheckError(LayerfuseError, RuntimeError):
    """A produced artefact (an exported graph, an engine) failed its correctness check."""
