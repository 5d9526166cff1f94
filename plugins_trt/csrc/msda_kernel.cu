// MSDeformAttn CUDA kernels and their launchers. No TensorRT dependency; the C ABI is msda_api.cu.
#include <algorithm>
#include <string>

#include <cuda_runtime.h>

#include "msda_dispatch.h"
#include "msda_kernel.cuh"
#include "msda_kernel.h"

namespace msda {

namespace {

constexpr int kBlock = 256;                 // threads per block, a multiple of 32 (backward groups stay in a warp)
constexpr int64_t kMaxBlocks = 1 << 30;     // grid-stride loops cover the rest

// The level table, [L] Level, is read from the index inputs into shared memory once per block.
template <typename Index>
__device__ void load_levels(const Index* __restrict__ shapes, const Index* __restrict__ starts, int32_t n_levels,
                            Level* levels) {
    for (int32_t l = threadIdx.x; l < n_levels; l += blockDim.x) {
        levels[l].h = static_cast<int32_t>(shapes[2 * l]);
        levels[l].w = static_cast<int32_t>(shapes[2 * l + 1]);
        levels[l].start = static_cast<int64_t>(starts[l]);
    }
    __syncthreads();
}

__device__ void load_levels_any(const void* shapes, const void* starts, int index_dtype, int32_t n_levels,
                                Level* levels) {
    if (index_dtype == MSDA_INT64)
        load_levels(static_cast<const int64_t*>(shapes), static_cast<const int64_t*>(starts), n_levels, levels);
    else
        load_levels(static_cast<const int32_t*>(shapes), static_cast<const int32_t*>(starts), n_levels, levels);
}

// Grid: one thread per (b, q, h, channel pack); output [B, Q, H*Dh].
template <typename T, int V, typename Off>
__global__ void __launch_bounds__(kBlock) forward_kernel(Problem pb, int index_dtype, const T* __restrict__ value,
                                                         const void* __restrict__ shapes,
                                                         const void* __restrict__ starts,
                                                         const float* __restrict__ loc,
                                                         const float* __restrict__ attn, T* __restrict__ out,
                                                         int64_t total) {
    extern __shared__ Level levels[];
    load_levels_any(shapes, starts, index_dtype, static_cast<int32_t>(pb.levels), levels);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride)
        forward_thread<T, V, Off>(static_cast<Off>(t), pb, levels, value, loc, attn, out);
}

// Grid: `group` lanes per (b, q, h); total = B*Q*H*group, a multiple of the group size, so whole groups are active.
template <typename T, int V, typename Off>
__global__ void __launch_bounds__(kBlock) backward_kernel(Problem pb, int index_dtype, int group,
                                                          const T* __restrict__ value,
                                                          const void* __restrict__ shapes,
                                                          const void* __restrict__ starts,
                                                          const float* __restrict__ loc,
                                                          const float* __restrict__ attn,
                                                          const T* __restrict__ grad_out, float* grad_value_acc,
                                                          float* __restrict__ grad_loc,
                                                          float* __restrict__ grad_attn, int64_t total) {
    extern __shared__ Level levels[];
    load_levels_any(shapes, starts, index_dtype, static_cast<int32_t>(pb.levels), levels);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of 32, hence of group
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride)
        backward_thread<T, V, Off>(static_cast<Off>(t / group), static_cast<int>(t % group), group, pb, levels,
                                   value, loc, attn, grad_out, grad_value_acc, grad_loc, grad_attn);
}

template <typename T>
__global__ void __launch_bounds__(kBlock) convert_kernel(const float* __restrict__ src, T* __restrict__ dst,
                                                         int64_t n) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
        convert_element<T, int64_t>(i, src, dst);
}

unsigned grid_for(int64_t threads) {
    return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((threads + kBlock - 1) / kBlock, kMaxBlocks)));
}

int check_launch(const char* what) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return fail(MSDA_STATUS_CUDA_ERROR, std::string(what) + ": " + cudaGetErrorString(err));
    return MSDA_STATUS_OK;
}

struct ForwardLaunch {
    const Problem& pb;
    int index_dtype;
    const ForwardArgs& args;
    cudaStream_t stream;

    template <typename T, int V, typename Off>
    int run() {
        const int64_t total = pb.batch * pb.queries * pb.heads * (pb.channels / V);
        const size_t smem = sizeof(Level) * static_cast<size_t>(pb.levels);
        forward_kernel<T, V, Off><<<grid_for(total), kBlock, smem, stream>>>(
            pb, index_dtype, static_cast<const T*>(args.value), args.spatial_shapes, args.level_start_index,
            args.sampling_locations, args.attention_weights, static_cast<T*>(args.output), total);
        return check_launch("msda forward kernel launch");
    }
};

struct BackwardLaunch {
    const Problem& pb;
    int index_dtype;
    const BackwardArgs& args;
    float* grad_value_acc;
    cudaStream_t stream;

    template <typename T, int V, typename Off>
    int run() {
        const int group = group_size(pb.channels / V);
        const int64_t total = pb.batch * pb.queries * pb.heads * group;
        const size_t smem = sizeof(Level) * static_cast<size_t>(pb.levels);
        backward_kernel<T, V, Off><<<grid_for(total), kBlock, smem, stream>>>(
            pb, index_dtype, group, static_cast<const T*>(args.value), args.spatial_shapes, args.level_start_index,
            args.sampling_locations, args.attention_weights, static_cast<const T*>(args.grad_output),
            grad_value_acc, args.grad_sampling_locations, args.grad_attention_weights, total);
        int status = check_launch("msda backward kernel launch");
        if (status != MSDA_STATUS_OK || std::is_same<T, float>::value) return status;
        const int64_t n = pb.batch * pb.spatial * pb.heads * pb.channels;
        convert_kernel<T><<<grid_for(n), kBlock, 0, stream>>>(grad_value_acc, static_cast<T*>(args.grad_value), n);
        return check_launch("msda grad_value conversion kernel launch");
    }
};

}  // namespace

int launch_forward(const Problem& pb, int value_dtype, int index_dtype, const ForwardArgs& args, cudaStream_t stream) {
    const void* ptrs[2] = {args.value, args.output};
    const int v = vector_width(value_dtype, pb.channels, kForwardMaxVector, ptrs, 2);
    ForwardLaunch launch{pb, index_dtype, args, stream};
    return dispatch<kForwardMaxVector>(value_dtype, v, needs_int64(pb), launch);
}

int launch_backward(const Problem& pb, int value_dtype, int index_dtype, const BackwardArgs& args, cudaStream_t stream) {
    const bool in_place = value_dtype == MSDA_FLOAT32;
    float* acc = in_place ? static_cast<float*>(args.grad_value) : args.workspace;
    const int64_t n = pb.batch * pb.spatial * pb.heads * pb.channels;
    if (n > 0) {
        const cudaError_t err = cudaMemsetAsync(acc, 0, sizeof(float) * static_cast<size_t>(n), stream);
        if (err != cudaSuccess)
            return fail(MSDA_STATUS_CUDA_ERROR, std::string("msda backward: zeroing grad_value: ") + cudaGetErrorString(err));
    }
    const void* ptrs[2] = {args.value, args.grad_output};
    const int v = vector_width(value_dtype, pb.channels, kBackwardMaxVector, ptrs, 2);
    BackwardLaunch launch{pb, index_dtype, args, acc, stream};
    return dispatch<kBackwardMaxVector>(value_dtype, v, needs_int64(pb), launch);
}

}  // namespace msda
