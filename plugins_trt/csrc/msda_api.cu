// MSDeformAttn C ABI (msda_api.h) over the CUDA launchers: argument checks, empty problems, status codes.
#include <string>

#include <cuda_runtime.h>

#include "msda_api.h"
#include "msda_dispatch.h"
#include "msda_kernel.h"

namespace {

int zero_async(void* p, size_t bytes, cudaStream_t stream, const char* what) {
    if (bytes == 0) return MSDA_STATUS_OK;
    const cudaError_t err = cudaMemsetAsync(p, 0, bytes, stream);
    if (err != cudaSuccess)
        return msda::fail(MSDA_STATUS_CUDA_ERROR, std::string("msda: zeroing ") + what + ": " + cudaGetErrorString(err));
    return MSDA_STATUS_OK;
}

}  // namespace

extern "C" {

MSDA_API int msda_forward(const void* value, const void* spatial_shapes, const void* level_start_index,
                          const float* sampling_locations, const float* attention_weights, void* output,
                          int64_t batch, int64_t spatial, int64_t heads, int64_t channels, int64_t queries,
                          int64_t levels, int64_t points, int value_dtype, int index_dtype, void* stream) {
    const msda::Problem pb{batch, spatial, heads, channels, queries, levels, points};
    int status = msda::check_problem(pb, value_dtype, index_dtype);
    if (status != MSDA_STATUS_OK || msda::empty_output(pb)) return status;
    if (output == nullptr || (levels > 0 && (spatial_shapes == nullptr || level_start_index == nullptr)) ||
        (levels * points > 0 && (value == nullptr || sampling_locations == nullptr || attention_weights == nullptr)))
        return msda::fail(MSDA_STATUS_INVALID_ARGUMENT, "msda_forward: null pointer");
    const msda::ForwardArgs args{value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output};
    return msda::launch_forward(pb, value_dtype, index_dtype, args, static_cast<cudaStream_t>(stream));
}

MSDA_API size_t msda_backward_workspace_size(int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                                             int value_dtype) {
    if (value_dtype == MSDA_FLOAT32 || batch <= 0 || spatial <= 0 || heads <= 0 || channels <= 0) return 0;
    return sizeof(float) * static_cast<size_t>(batch * spatial * heads * channels);
}

MSDA_API int msda_backward(const void* value, const void* spatial_shapes, const void* level_start_index,
                           const float* sampling_locations, const float* attention_weights, const void* grad_output,
                           void* grad_value, float* grad_sampling_locations, float* grad_attention_weights,
                           void* workspace, int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                           int64_t queries, int64_t levels, int64_t points, int value_dtype, int index_dtype,
                           void* stream) {
    const msda::Problem pb{batch, spatial, heads, channels, queries, levels, points};
    int status = msda::check_problem(pb, value_dtype, index_dtype);
    if (status != MSDA_STATUS_OK) return status;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const size_t value_bytes = msda::element_size(value_dtype) * static_cast<size_t>(batch * spatial * heads * channels);
    const size_t point_count = static_cast<size_t>(batch * queries * heads * levels * points);
    if ((value_bytes > 0 && grad_value == nullptr) ||
        (point_count > 0 && (grad_sampling_locations == nullptr || grad_attention_weights == nullptr)))
        return msda::fail(MSDA_STATUS_INVALID_ARGUMENT, "msda_backward: null gradient pointer");
    if (msda::empty_output(pb)) {  // no output element: every gradient is zero
        if ((status = zero_async(grad_value, value_bytes, s, "grad_value")) != MSDA_STATUS_OK) return status;
        if ((status = zero_async(grad_sampling_locations, 2 * sizeof(float) * point_count, s, "grad_sampling_locations")) != MSDA_STATUS_OK)
            return status;
        return zero_async(grad_attention_weights, sizeof(float) * point_count, s, "grad_attention_weights");
    }
    if (value == nullptr || grad_output == nullptr || (levels > 0 && (spatial_shapes == nullptr || level_start_index == nullptr)) ||
        (point_count > 0 && (sampling_locations == nullptr || attention_weights == nullptr)) ||
        (value_dtype != MSDA_FLOAT32 && value_bytes > 0 && workspace == nullptr))
        return msda::fail(MSDA_STATUS_INVALID_ARGUMENT,
                          "msda_backward: null pointer (fp16/bf16 value needs msda_backward_workspace_size() bytes of workspace)");
    const msda::BackwardArgs args{value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                  grad_output, grad_value, grad_sampling_locations, grad_attention_weights,
                                  static_cast<float*>(workspace)};
    return msda::launch_backward(pb, value_dtype, index_dtype, args, s);
}

}  // extern "C"
