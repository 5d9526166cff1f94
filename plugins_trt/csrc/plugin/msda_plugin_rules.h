// MSDeformAttn plugin rules with no TensorRT dependency (unit-tested with g++): I/O count, accepted types and
// formats, output type and shape, the problem sizes read from concrete shapes, and creation-field checks.
// msda_plugin.cpp maps TensorRT's types onto these and calls them.
//
// Inputs, in the order of the ONNX node and of NVIDIA's MultiscaleDeformableAttnPlugin_TRT:
//   0 value              [B, S, H, Dh]        float32 / float16 / bfloat16, linear
//   1 spatial_shapes     [L, 2]               int32 or int64, linear
//   2 level_start_index  [L]                  same type as input 1
//   3 sampling_locations [B, Q, H, L, P, 2]   float32
//   4 attention_weights  [B, Q, H, L, P]      float32
// Output:
//   0 output             [B, Q, H*Dh]         the value type
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "msda_api.h"

namespace msda {
namespace plugin {

constexpr int kNbInputs = 5;
constexpr int kNbOutputs = 1;
constexpr int kMaxRank = 8;  // nvinfer1::Dims::MAX_DIMS

enum Input : int { kValue = 0, kSpatialShapes = 1, kLevelStartIndex = 2, kSamplingLocations = 3, kAttentionWeights = 4 };

enum class Type { kFloat, kHalf, kBFloat16, kInt32, kInt64, kOther };

struct TensorFormat {
    Type type;
    bool linear;  // row-major (TensorFormat::kLINEAR)
};

// A shape with -1 for a dimension unknown at build time.
struct Shape {
    int32_t rank;
    int64_t d[kMaxRank];
};

inline bool is_value_type(Type t) { return t == Type::kFloat || t == Type::kHalf || t == Type::kBFloat16; }
inline bool is_index_type(Type t) { return t == Type::kInt32 || t == Type::kInt64; }

// supportsFormatCombination: may look at io[0..pos] only (TensorRT fills later positions with garbage).
inline bool supports_format(int pos, const TensorFormat* io, int nb_inputs, int nb_outputs) {
    if (nb_inputs != kNbInputs || nb_outputs != kNbOutputs || pos < 0 || pos >= nb_inputs + nb_outputs) return false;
    const TensorFormat& t = io[pos];
    if (!t.linear) return false;
    switch (pos) {
        case kValue:
            return is_value_type(t.type);
        case kSpatialShapes:
            return is_index_type(t.type);
        case kLevelStartIndex:
            return t.type == io[kSpatialShapes].type;  // one index dtype for both (the C ABI takes one)
        case kSamplingLocations:
        case kAttentionWeights:
            return t.type == Type::kFloat;
        default:  // the output
            return t.type == io[kValue].type;
    }
}

// getOutputDataTypes: the output has the value's type. Returns false if the value type is not supported.
inline bool output_type(const Type* inputs, int nb_inputs, Type* out) {
    if (nb_inputs != kNbInputs || !is_value_type(inputs[kValue])) return false;
    *out = inputs[kValue];
    return true;
}

inline bool known(int64_t d) { return d >= 0; }

inline bool agree(int64_t a, int64_t b) { return !known(a) || !known(b) || a == b; }

// Ranks and the dimensions that must agree between inputs (unknown dimensions are accepted).
// Returns "" when the shapes are consistent, else a message naming the offending input.
inline std::string check_shapes(const Shape* in, int nb_inputs) {
    if (nb_inputs != kNbInputs) return "MSDeformAttn takes 5 inputs, got " + std::to_string(nb_inputs);
    const Shape& v = in[kValue];
    const Shape& s = in[kSpatialShapes];
    const Shape& st = in[kLevelStartIndex];
    const Shape& loc = in[kSamplingLocations];
    const Shape& a = in[kAttentionWeights];
    if (v.rank != 4) return "value must be [B, S, H, Dh], got rank " + std::to_string(v.rank);
    if (s.rank != 2 || !agree(s.d[1], 2)) return "spatial_shapes must be [L, 2]";
    if (st.rank != 1) return "level_start_index must be [L]";
    if (loc.rank != 6 || !agree(loc.d[5], 2)) return "sampling_locations must be [B, Q, H, L, P, 2]";
    if (a.rank != 5) return "attention_weights must be [B, Q, H, L, P]";
    if (!agree(loc.d[0], v.d[0]) || !agree(a.d[0], v.d[0])) return "batch differs between value and the locations/weights";
    if (!agree(loc.d[2], v.d[2]) || !agree(a.d[2], v.d[2])) return "heads differ between value and the locations/weights";
    if (!agree(s.d[0], st.d[0]) || !agree(loc.d[3], s.d[0]) || !agree(a.d[3], s.d[0]))
        return "the number of levels L differs between spatial_shapes, level_start_index and the locations/weights";
    for (int i = 1; i < 5; ++i)
        if (i != 2 && i != 3 && !agree(loc.d[i], a.d[i]))
            return "sampling_locations and attention_weights disagree on queries or points";
    return "";
}

// getOutputShapes for known dimensions: [B, Q, H*Dh] (-1 where an operand is unknown).
inline Shape output_shape(const Shape* in) {
    const Shape& v = in[kValue];
    const Shape& loc = in[kSamplingLocations];
    Shape out{};
    out.rank = 3;
    out.d[0] = v.d[0];
    out.d[1] = loc.d[1];
    out.d[2] = known(v.d[2]) && known(v.d[3]) ? v.d[2] * v.d[3] : -1;
    return out;
}

// Problem sizes for the launcher, from the concrete shapes seen at enqueue time.
struct Sizes {
    int64_t batch, spatial, heads, channels, queries, levels, points;
};

inline std::string sizes_from_shapes(const Shape* in, int nb_inputs, Sizes* out) {
    std::string err = check_shapes(in, nb_inputs);
    if (!err.empty()) return err;
    for (int i = 0; i < nb_inputs; ++i)
        for (int k = 0; k < in[i].rank; ++k)
            if (!known(in[i].d[k])) return "input " + std::to_string(i) + " has an unknown dimension at run time";
    const Shape& v = in[kValue];
    const Shape& loc = in[kSamplingLocations];
    *out = Sizes{v.d[0], v.d[1], v.d[2], v.d[3], loc.d[1], loc.d[3], loc.d[4]};
    return "";
}

// Type codes of the C ABI.
inline int value_dtype_code(Type t) {
    return t == Type::kHalf ? MSDA_FLOAT16 : t == Type::kBFloat16 ? MSDA_BFLOAT16 : MSDA_FLOAT32;
}
inline int index_dtype_code(Type t) { return t == Type::kInt64 ? MSDA_INT64 : MSDA_INT32; }

// Creation fields. The plugin has no attributes; the ONNX node's plugin_version / plugin_namespace are the plugin's
// identity, not fields, and are accepted if a parser passes them. Returns "" or a message naming the unknown field
// (the creator logs it as a warning and goes on: unknown fields change nothing).
inline std::string check_field(const char* name) {
    if (name == nullptr) return "a creation field has no name";
    if (std::strcmp(name, "plugin_version") == 0 || std::strcmp(name, "plugin_namespace") == 0) return "";
    return std::string("MSDeformAttn has no field '") + name + "'; ignored";
}

}  // namespace plugin
}  // namespace msda
