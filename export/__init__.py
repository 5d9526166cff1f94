"""layerfuse.export: ONNX / TensorRT front ends and transformers checkpoints.

Importing it registers the `layerfuse_vlm` model type with transformers (AutoConfig, AutoModelForImageTextToText,
AutoProcessor): see hf_model.py.
"""

from . import hf_model  # noqa: F401  (registers layerfuse_vlm)
