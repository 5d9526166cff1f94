/* MSDeformAttn C ABI: forward and backward launchers over raw pointers, usable from ctypes and the TensorRT plugin.
 *
 *   value              [B, S, H, Dh]        value_dtype (MSDA_FLOAT32 / MSDA_FLOAT16 / MSDA_BFLOAT16)
 *   spatial_shapes     [L, 2]               index_dtype (MSDA_INT32 / MSDA_INT64), (h, w) per level
 *   level_start_index  [L]                  index_dtype
 *   sampling_locations [B, Q, H, L, P, 2]   float32, normalised (x, y)
 *   attention_weights  [B, Q, H, L, P]      float32
 *   output             [B, Q, H*Dh]         value_dtype
 *
 * All tensors are contiguous and live on the device (host memory for the *_host variants). Coordinates and the
 * accumulation are float32. Every function returns MSDA_STATUS_OK (0) or an error code; msda_status_string() and
 * msda_last_error() describe it. The launchers are asynchronous on `stream` (a cudaStream_t, NULL = legacy default
 * stream); a fault inside a kernel surfaces at the next synchronisation.
 *
 * The *_host functions run the same per-thread arithmetic (msda_kernel.cuh) on the CPU, one lane at a time; they
 * exist to test the kernel's math where no GPU is present and ignore `stream`.
 */
#ifndef LAYERFUSE_MSDA_API_H
#define LAYERFUSE_MSDA_API_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MSDA_API __declspec(dllexport)
#else
#define MSDA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum {
    MSDA_FLOAT32 = 0,
    MSDA_FLOAT16 = 1,
    MSDA_BFLOAT16 = 2
};

enum {
    MSDA_INT32 = 0,
    MSDA_INT64 = 1
};

enum {
    MSDA_STATUS_OK = 0,
    MSDA_STATUS_INVALID_ARGUMENT = 1, /* negative size, null pointer, too many levels, Dh not representable */
    MSDA_STATUS_UNSUPPORTED_DTYPE = 2,
    MSDA_STATUS_CUDA_ERROR = 3 /* a CUDA call or kernel launch failed; msda_last_error() has CUDA's message */
};

#define MSDA_MAX_LEVELS 1024 /* the level table lives in shared memory: 16 bytes per level */

/* ABI version of this header: bump when a signature changes. */
MSDA_API int msda_abi_version(void);

MSDA_API const char* msda_status_string(int status);

/* The message of the last failure on the calling thread ("" if none). */
MSDA_API const char* msda_last_error(void);

MSDA_API int msda_forward(const void* value, const void* spatial_shapes, const void* level_start_index,
                          const float* sampling_locations, const float* attention_weights, void* output,
                          int64_t batch, int64_t spatial, int64_t heads, int64_t channels, int64_t queries,
                          int64_t levels, int64_t points, int value_dtype, int index_dtype, void* stream);

/* Bytes of float32 scratch that msda_backward needs in `workspace` (0 for float32 value: it accumulates in
 * grad_value directly). */
MSDA_API size_t msda_backward_workspace_size(int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                                             int value_dtype);

/* grad_value [B, S, H, Dh] value_dtype, grad_sampling_locations [B, Q, H, L, P, 2] float32 and
 * grad_attention_weights [B, Q, H, L, P] float32 are overwritten (nothing needs zeroing). grad_value sums
 * contributions with float32 atomics, so its last bits may differ from run to run; the other two are deterministic. */
MSDA_API int msda_backward(const void* value, const void* spatial_shapes, const void* level_start_index,
                           const float* sampling_locations, const float* attention_weights, const void* grad_output,
                           void* grad_value, float* grad_sampling_locations, float* grad_attention_weights,
                           void* workspace, int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                           int64_t queries, int64_t levels, int64_t points, int value_dtype, int index_dtype,
                           void* stream);

/* Host (CPU) builds of the same arithmetic, same arguments; in libmsda_host.so. */
MSDA_API int msda_forward_host(const void* value, const void* spatial_shapes, const void* level_start_index,
                               const float* sampling_locations, const float* attention_weights, void* output,
                               int64_t batch, int64_t spatial, int64_t heads, int64_t channels, int64_t queries,
                               int64_t levels, int64_t points, int value_dtype, int index_dtype, void* stream);

MSDA_API int msda_backward_host(const void* value, const void* spatial_shapes, const void* level_start_index,
                                const float* sampling_locations, const float* attention_weights,
                                const void* grad_output, void* grad_value, float* grad_sampling_locations,
                                float* grad_attention_weights, void* workspace, int64_t batch, int64_t spatial,
                                int64_t heads, int64_t channels, int64_t queries, int64_t levels, int64_t points,
                                int value_dtype, int index_dtype, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LAYERFUSE_MSDA_API_H */
