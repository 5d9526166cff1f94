// MSDeformAttn CUDA launchers (C++ side, no TensorRT): dtype / vector width / offset width dispatch.
// The C ABI around them is msda_api.h; the arithmetic is msda_kernel.cuh.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "msda_api.h"

namespace msda {

struct Problem;

// Inputs as the C ABI receives them; see msda_api.h for shapes.
struct ForwardArgs {
    const void* value;
    const void* spatial_shapes;
    const void* level_start_index;
    const float* sampling_locations;
    const float* attention_weights;
    void* output;
};

struct BackwardArgs {
    const void* value;
    const void* spatial_shapes;
    const void* level_start_index;
    const float* sampling_locations;
    const float* attention_weights;
    const void* grad_output;
    void* grad_value;
    float* grad_sampling_locations;
    float* grad_attention_weights;
    float* workspace;  // B*S*H*Dh floats when the value dtype is not float32, else unused
};

// Enqueue on `stream`; return an MSDA_STATUS_* code (launch errors included, kernel faults surface later).
int launch_forward(const Problem& pb, int value_dtype, int index_dtype, const ForwardArgs& args, cudaStream_t stream);
int launch_backward(const Problem& pb, int value_dtype, int index_dtype, const BackwardArgs& args, cudaStream_t stream);

}  // namespace msda
