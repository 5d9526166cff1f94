"""The MSDeformAttn plugin's identity, shared by the ONNX exporter (custom node) and the TensorRT plugin.

These values must equal those in `csrc/plugin/msda_plugin_info.h` (a test checks that they do). TensorRT looks a
plugin up by (name, version, namespace); the ONNX parser takes them from the node's op_type and its
`plugin_version` / `plugin_namespace` attributes. Keep them stable: engines and ONNX files carry them.
"""

from __future__ import annotations

PLUGIN_NAME = "MSDeformAttn"  # TensorRT plugin name == ONNX op_type
PLUGIN_VERSION = "1"  # TensorRT plugin version == ONNX attribute plugin_version
PLUGIN_NAMESPACE = "layerfuse"  # TensorRT plugin namespace == ONNX attribute plugin_namespace
ONNX_DOMAIN = "layerfuse"  # ONNX domain of the custom node
ONNX_DOMAIN_VERSION = 1  # opset version of that domain

__all__ = ["ONNX_DOMAIN", "ONNX_DOMAIN_VERSION", "PLUGIN_NAME", "PLUGIN_NAMESPACE", "PLUGIN_VERSION"]
