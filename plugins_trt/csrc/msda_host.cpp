// MSDeformAttn host build: the kernels' per-thread functions (msda_kernel.cuh) run on the CPU, one lane at a time,
// with the same launch decisions (msda_dispatch.h). It exists so that the kernel arithmetic (indexing, borders, level
// offsets, fp16/bf16 conversion, int32/int64 index inputs, backward) is testable without a GPU; it is not fast.
// The backward runs one lane per (b, q, h) group (group size 1), so the warp-shuffle reduction is the one piece of
// the device path it cannot exercise.
#include <cstring>
#include <string>
#include <vector>

#include "msda_api.h"
#include "msda_dispatch.h"
#include "msda_kernel.cuh"

namespace {

using msda::Level;
using msda::Problem;

std::vector<Level> host_levels(const void* shapes, const void* starts, int index_dtype, int64_t n_levels) {
    std::vector<Level> levels(static_cast<size_t>(n_levels));
    for (int64_t l = 0; l < n_levels; ++l) {
        if (index_dtype == MSDA_INT64) {
            levels[l] = {static_cast<int32_t>(static_cast<const int64_t*>(shapes)[2 * l]),
                         static_cast<int32_t>(static_cast<const int64_t*>(shapes)[2 * l + 1]),
                         static_cast<const int64_t*>(starts)[l]};
        } else {
            levels[l] = {static_cast<const int32_t*>(shapes)[2 * l], static_cast<const int32_t*>(shapes)[2 * l + 1],
                         static_cast<const int32_t*>(starts)[l]};
        }
    }
    return levels;
}

struct HostForward {
    const Problem& pb;
    const Level* levels;
    const void* value;
    const float* loc;
    const float* attn;
    void* out;

    template <typename T, int V, typename Off>
    int run() {
        const int64_t total = pb.batch * pb.queries * pb.heads * (pb.channels / V);
        for (int64_t t = 0; t < total; ++t)
            msda::forward_thread<T, V, Off>(static_cast<Off>(t), pb, levels, static_cast<const T*>(value), loc, attn,
                                            static_cast<T*>(out));
        return MSDA_STATUS_OK;
    }
};

struct HostBackward {
    const Problem& pb;
    const Level* levels;
    const void* value;
    const float* loc;
    const float* attn;
    const void* grad_out;
    void* grad_value;
    float* grad_value_acc;
    float* grad_loc;
    float* grad_attn;

    template <typename T, int V, typename Off>
    int run() {
        const int64_t bqh = pb.batch * pb.queries * pb.heads;
        for (int64_t g = 0; g < bqh; ++g)
            msda::backward_thread<T, V, Off>(static_cast<Off>(g), 0, 1, pb, levels, static_cast<const T*>(value), loc,
                                             attn, static_cast<const T*>(grad_out), grad_value_acc, grad_loc, grad_attn);
        if (!std::is_same<T, float>::value) {
            const int64_t n = pb.batch * pb.spatial * pb.heads * pb.channels;
            for (int64_t i = 0; i < n; ++i) msda::convert_element<T, int64_t>(i, grad_value_acc, static_cast<T*>(grad_value));
        }
        return MSDA_STATUS_OK;
    }
};

}  // namespace

extern "C" {

MSDA_API int msda_forward_host(const void* value, const void* spatial_shapes, const void* level_start_index,
                               const float* sampling_locations, const float* attention_weights, void* output,
                               int64_t batch, int64_t spatial, int64_t heads, int64_t channels, int64_t queries,
                               int64_t levels, int64_t points, int value_dtype, int index_dtype, void* /*stream*/) {
    const Problem pb{batch, spatial, heads, channels, queries, levels, points};
    const int status = msda::check_problem(pb, value_dtype, index_dtype);
    if (status != MSDA_STATUS_OK || msda::empty_output(pb)) return status;
    if (output == nullptr || (levels > 0 && (spatial_shapes == nullptr || level_start_index == nullptr)) ||
        (levels * points > 0 && (value == nullptr || sampling_locations == nullptr || attention_weights == nullptr)))
        return msda::fail(MSDA_STATUS_INVALID_ARGUMENT, "msda_forward_host: null pointer");
    const std::vector<Level> table = host_levels(spatial_shapes, level_start_index, index_dtype, levels);
    const void* ptrs[2] = {value, output};
    const int v = msda::vector_width(value_dtype, channels, msda::kForwardMaxVector, ptrs, 2);
    HostForward run{pb, table.data(), value, sampling_locations, attention_weights, output};
    return msda::dispatch<msda::kForwardMaxVector>(value_dtype, v, msda::needs_int64(pb), run);
}

MSDA_API int msda_backward_host(const void* value, const void* spatial_shapes, const void* level_start_index,
                                const float* sampling_locations, const float* attention_weights,
                                const void* grad_output, void* grad_value, float* grad_sampling_locations,
                                float* grad_attention_weights, void* workspace, int64_t batch, int64_t spatial,
                                int64_t heads, int64_t channels, int64_t queries, int64_t levels, int64_t points,
                                int value_dtype, int index_dtype, void* /*stream*/) {
    const Problem pb{batch, spatial, heads, channels, queries, levels, points};
    const int status = msda::check_problem(pb, value_dtype, index_dtype);
    if (status != MSDA_STATUS_OK) return status;
    const int64_t n_value = batch * spatial * heads * channels;
    const int64_t n_points = batch * queries * heads * levels * points;
    if ((n_value > 0 && grad_value == nullptr) ||
        (n_points > 0 && (grad_sampling_locations == nullptr || grad_attention_weights == nullptr)))
        return msda::fail(MSDA_STATUS_INVALID_ARGUMENT, "msda_backward_host: null gradient pointer");
    const bool in_place = value_dtype == MSDA_FLOAT32;
    if (n_value > 0) std::memset(grad_value, 0, msda::element_size(value_dtype) * static_cast<size_t>(n_value));
    if (msda::empty_output(pb)) {
        if (n_points > 0) {
            std::memset(grad_sampling_locations, 0, 2 * sizeof(float) * static_cast<size_t>(n_points));
            std::memset(grad_attention_weights, 0, sizeof(float) * static_cast<size_t>(n_points));
        }
        return MSDA_STATUS_OK;
    }
    if (value == nullptr || grad_output == nullptr || (levels > 0 && (spatial_shapes == nullptr || level_start_index == nullptr)) ||
        (n_points > 0 && (sampling_locations == nullptr || attention_weights == nullptr)) ||
        (!in_place && n_value > 0 && workspace == nullptr))
        return msda::fail(MSDA_STATUS_INVALID_ARGUMENT,
                          "msda_backward_host: null pointer (fp16/bf16 value needs msda_backward_workspace_size() bytes of workspace)");
    float* acc = in_place ? static_cast<float*>(grad_value) : static_cast<float*>(workspace);
    if (!in_place && n_value > 0) std::memset(acc, 0, sizeof(float) * static_cast<size_t>(n_value));
    const std::vector<Level> table = host_levels(spatial_shapes, level_start_index, index_dtype, levels);
    const void* ptrs[2] = {value, grad_output};
    const int v = msda::vector_width(value_dtype, channels, msda::kBackwardMaxVector, ptrs, 2);
    HostBackward run{pb, table.data(), value, sampling_locations, attention_weights, grad_output, grad_value, acc,
                     grad_sampling_locations, grad_attention_weights};
    return msda::dispatch<msda::kBackwardMaxVector>(value_dtype, v, msda::needs_int64(pb), run);
}

MSDA_API size_t msda_backward_workspace_size(int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                                             int value_dtype) {
    if (value_dtype == MSDA_FLOAT32 || batch <= 0 || spatial <= 0 || heads <= 0 || channels <= 0) return 0;
    return sizeof(float) * static_cast<size_t>(batch * spatial * heads * channels);
}

}  // extern "C"
