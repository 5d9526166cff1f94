// MSDeformAttn launch decisions shared by the CUDA launchers (msda_kernel.cu) and the host build (msda_host.cpp):
// argument checks, vector width, 32/64-bit offsets, and the (dtype, V, offset) -> template dispatch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "msda_api.h"
#include "msda_kernel.cuh"

namespace msda {

// Thread-local message behind msda_last_error(); set together with a non-OK status.
void set_last_error(const std::string& message);
int fail(int status, const std::string& message);

inline size_t element_size(int value_dtype) { return value_dtype == MSDA_FLOAT32 ? 4 : 2; }

inline bool valid_value_dtype(int value_dtype) {
    return value_dtype == MSDA_FLOAT32 || value_dtype == MSDA_FLOAT16 || value_dtype == MSDA_BFLOAT16;
}

inline bool valid_index_dtype(int index_dtype) { return index_dtype == MSDA_INT32 || index_dtype == MSDA_INT64; }

// Checks sizes and dtypes; returns MSDA_STATUS_OK or an error status with msda_last_error() set.
inline int check_problem(const Problem& pb, int value_dtype, int index_dtype) {
    if (!valid_value_dtype(value_dtype))
        return fail(MSDA_STATUS_UNSUPPORTED_DTYPE, "value dtype must be MSDA_FLOAT32, MSDA_FLOAT16 or MSDA_BFLOAT16, got " +
                                                       std::to_string(value_dtype));
    if (!valid_index_dtype(index_dtype))
        return fail(MSDA_STATUS_UNSUPPORTED_DTYPE, "index dtype must be MSDA_INT32 or MSDA_INT64, got " +
                                                       std::to_string(index_dtype));
    if (pb.batch < 0 || pb.spatial < 0 || pb.heads < 0 || pb.channels < 0 || pb.queries < 0 || pb.levels < 0 ||
        pb.points < 0)
        return fail(MSDA_STATUS_INVALID_ARGUMENT, "sizes must be non-negative");
    if (pb.levels > MSDA_MAX_LEVELS)
        return fail(MSDA_STATUS_INVALID_ARGUMENT, "at most " + std::to_string(MSDA_MAX_LEVELS) + " levels, got " +
                                                      std::to_string(pb.levels));
    if (pb.levels * pb.points > INT32_MAX / 2)
        return fail(MSDA_STATUS_INVALID_ARGUMENT, "levels * points too large");
    return MSDA_STATUS_OK;
}

// Nothing to compute (and no pointer needs to be valid) when the output or the sum is empty.
inline bool empty_output(const Problem& pb) {
    return pb.batch == 0 || pb.queries == 0 || pb.heads == 0 || pb.channels == 0;
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Largest V in {max_v, ..., 2, 1} (16 bytes at most per load) that divides Dh and to which every pointer is aligned.
inline int vector_width(int value_dtype, int64_t channels, int max_v, const void* const* ptrs, int n_ptrs) {
    const size_t elem = element_size(value_dtype);
    for (int v = max_v; v > 1; v /= 2) {
        if (elem * static_cast<size_t>(v) > 16 || channels % v != 0) continue;
        bool ok = true;
        for (int i = 0; i < n_ptrs; ++i) ok = ok && (ptrs[i] == nullptr || aligned(ptrs[i], elem * v));
        if (ok) return v;
    }
    return 1;
}

// 64-bit offsets when any element count the kernels index exceeds int32. LAYERFUSE_MSDA_WIDE_OFFSETS=1 forces them
// (tests exercise the 64-bit instantiations on small problems that way).
inline bool needs_int64(const Problem& pb) {
    const char* force = std::getenv("LAYERFUSE_MSDA_WIDE_OFFSETS");
    if (force != nullptr && force[0] == '1') return true;
    const int64_t limit = INT32_MAX;
    const int64_t bqh = pb.batch * pb.queries * pb.heads;
    return pb.batch * pb.spatial * pb.heads * pb.channels > limit || bqh * pb.channels > limit ||
           bqh * pb.levels * pb.points * 2 > limit || bqh * 32 > limit;
}

// Calls f.template run<T, V, Off>() for the runtime (value dtype, vector width, offset width); V > max_v is refused.
template <int MaxV, typename T, typename F>
int dispatch_vector(int v, bool wide, F& f) {
    switch (v) {
        case 8:
            if constexpr (MaxV >= 8 && sizeof(T) == 2) {
                return wide ? f.template run<T, 8, int64_t>() : f.template run<T, 8, int32_t>();
            }
            break;
        case 4:
            if constexpr (MaxV >= 4) {
                return wide ? f.template run<T, 4, int64_t>() : f.template run<T, 4, int32_t>();
            }
            break;
        case 2:
            return wide ? f.template run<T, 2, int64_t>() : f.template run<T, 2, int32_t>();
        case 1:
            return wide ? f.template run<T, 1, int64_t>() : f.template run<T, 1, int32_t>();
        default:
            break;
    }
    return fail(MSDA_STATUS_INVALID_ARGUMENT, "internal: unsupported vector width " + std::to_string(v));
}

template <int MaxV, typename F>
int dispatch(int value_dtype, int v, bool wide, F& f) {
    switch (value_dtype) {
        case MSDA_FLOAT32:
            return dispatch_vector<MaxV, float>(v, wide, f);
        case MSDA_FLOAT16:
            return dispatch_vector<MaxV, __half>(v, wide, f);
        case MSDA_BFLOAT16:
            return dispatch_vector<MaxV, __nv_bfloat16>(v, wide, f);
        default:
            return fail(MSDA_STATUS_UNSUPPORTED_DTYPE, "unsupported value dtype " + std::to_string(value_dtype));
    }
}

constexpr int kForwardMaxVector = 8;   // 16-bit: 8 channels = 16 bytes; float32 stops at 4 (16 bytes)
constexpr int kBackwardMaxVector = 4;  // grad_value is scattered with scalar atomics; 4 keeps registers low

}  // namespace msda
