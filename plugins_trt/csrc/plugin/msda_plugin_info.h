// The MSDeformAttn TensorRT plugin's identity. Must equal plugins_trt/info.py (PLUGIN_NAME, PLUGIN_VERSION,
// PLUGIN_NAMESPACE), which the ONNX exporter writes on the custom node (op_type, plugin_version, plugin_namespace);
// a test checks that both agree.
#pragma once

#define LAYERFUSE_MSDA_PLUGIN_NAME "MSDeformAttn"
#define LAYERFUSE_MSDA_PLUGIN_VERSION "1"
#define LAYERFUSE_MSDA_PLUGIN_NAMESPACE "layerfuse"
