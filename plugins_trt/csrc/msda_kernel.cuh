// MSDeformAttn: the per-thread math shared by the CUDA kernels (msda_kernel.cu) and the host build (msda_host.cpp).
//
// Contract (SPEC section 4; row-major, contiguous):
//   value              [B, S, H, Dh]        T = float / __half / __nv_bfloat16
//   spatial_shapes     [L, 2]               int32 or int64, (h, w) per level
//   level_start_index  [L]                  int32 or int64
//   sampling_locations [B, Q, H, L, P, 2]   float, normalised (x, y)
//   attention_weights  [B, Q, H, L, P]      float
//   output             [B, Q, H*Dh]         T
// out[b, q, h*Dh + c] = sum_{l,p} attn * bilinear(value_l[:, h, c], x*w_l - 0.5, y*h_l - 0.5), zero outside the map.
// Coordinates and accumulation are fp32 whatever T is.
//
// Work split: one "thread" = one (b, q, h) and one pack of V consecutive channels (vectorised loads). The backward
// pass groups G lanes per (b, q, h) (G a power of two <= 32) and reduces the per-point gradients across the group.
// Every function here is __host__ __device__ so that msda_host.cpp runs exactly this arithmetic on the CPU; the only
// device-only pieces are the warp shuffle in msda_group_sum and the atomics in msda_atomic_add.
// No TensorRT dependency.
#pragma once

#include <math.h>

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define MSDA_HD __host__ __device__ __forceinline__
#define MSDA_UNROLL _Pragma("unroll")
#else
#define MSDA_HD inline
#define MSDA_UNROLL
#endif

namespace msda {

// Problem sizes; every count is int64 so that products never overflow before the offset type is chosen.
struct Problem {
    int64_t batch;     // B
    int64_t spatial;   // S = sum_l h_l * w_l
    int64_t heads;     // H
    int64_t channels;  // Dh
    int64_t queries;   // Q
    int64_t levels;    // L
    int64_t points;    // P
};

// One level of the value map, read once per block (device) or once per call (host) from the index inputs.
struct Level {
    int32_t h;
    int32_t w;
    int64_t start;  // first row of the level in S
};

// ---- value dtype <-> float -----------------------------------------------------------------------------------

MSDA_HD float to_float(float v) { return v; }
MSDA_HD float to_float(__half v) { return __half2float(v); }
MSDA_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
MSDA_HD T from_float(float v);
template <>
MSDA_HD float from_float<float>(float v) { return v; }
template <>
MSDA_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MSDA_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- vectorised channel packs --------------------------------------------------------------------------------

// V consecutive channels, aligned to their size, so one load moves 4/8/16 bytes (ld.global.v2/v4 on the device).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

template <typename T, int V>
MSDA_HD void load_pack(const T* p, float (&out)[V]) {  // p aligned to sizeof(T)*V
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
MSDA_UNROLL
    for (int i = 0; i < V; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T, int V>
MSDA_HD void store_pack(T* p, const float (&in)[V]) {
    Pack<T, V> pk;
MSDA_UNROLL
    for (int i = 0; i < V; ++i) pk.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// ---- bilinear sampling of one point --------------------------------------------------------------------------

// The four corners (x0,y0) (x0+1,y0) (x0,y0+1) (x0+1,y0+1) of pixel coordinates (x, y) on an h x w map:
// row index y*w + x within the level and bilinear weight; corners outside the map get valid = false (zero padding).
struct Corners {
    int32_t row[4];
    float weight[4];
    bool valid[4];
    float fx, fy;  // fractional parts, for the location gradient
    bool any;      // false when the point is entirely outside (x <= -1, x >= w, ..., or NaN)
};

MSDA_HD Corners bilinear_corners(float x, float y, int32_t h, int32_t w) {
    Corners c;
    // The comparisons also reject NaN and keep the float -> int conversion below in range. x == -1 is kept (all its
    // weight is on an outside corner, so it samples 0) for its location gradient: the right derivative, as
    // grid_sample's backward takes it at a corner (floor convention).
    c.any = x >= -1.0f && y >= -1.0f && x < static_cast<float>(w) && y < static_cast<float>(h);
    const float xf = c.any ? floorf(x) : 0.0f;
    const float yf = c.any ? floorf(y) : 0.0f;
    const int32_t x0 = static_cast<int32_t>(xf);
    const int32_t y0 = static_cast<int32_t>(yf);
    c.fx = c.any ? x - xf : 0.0f;
    c.fy = c.any ? y - yf : 0.0f;
    const float gx = 1.0f - c.fx;
    const float gy = 1.0f - c.fy;
    const int32_t cx[4] = {x0, x0 + 1, x0, x0 + 1};
    const int32_t cy[4] = {y0, y0, y0 + 1, y0 + 1};
    const float wt[4] = {gx * gy, c.fx * gy, gx * c.fy, c.fx * c.fy};
MSDA_UNROLL
    for (int k = 0; k < 4; ++k) {
        c.valid[k] = c.any && cx[k] >= 0 && cx[k] < w && cy[k] >= 0 && cy[k] < h;
        c.row[k] = c.valid[k] ? cy[k] * w + cx[k] : 0;
        c.weight[k] = c.valid[k] ? wt[k] : 0.0f;
    }
    return c;
}

// acc[c] += attn * sum_k weight_k * value[row_k, c] for one pack of V channels. `level_value` points at channel
// pack 0 of row 0 of the level for this (b, h); rows are `row_stride` = H*Dh elements apart.
template <typename T, int V, typename Off>
MSDA_HD void accumulate_point(const T* level_value, Off row_stride, const Corners& c, float attn, float (&acc)[V]) {
MSDA_UNROLL
    for (int k = 0; k < 4; ++k) {
        if (!c.valid[k]) continue;
        float v[V];
        load_pack<T, V>(level_value + static_cast<Off>(c.row[k]) * row_stride, v);
        const float coef = attn * c.weight[k];
MSDA_UNROLL
        for (int i = 0; i < V; ++i) acc[i] += coef * v[i];
    }
}

// ---- forward: one (b, q, h, channel pack) ------------------------------------------------------------------

template <typename T, int V, typename Off>
MSDA_HD void forward_thread(Off t, const Problem& pb, const Level* levels, const T* value, const float* loc,
                            const float* attn, T* out) {
    const Off packs = static_cast<Off>(pb.channels / V);
    const Off n_heads = static_cast<Off>(pb.heads);
    const Off n_queries = static_cast<Off>(pb.queries);
    const Off pack = t % packs;
    const Off bqh = t / packs;                 // (b*Q + q)*H + h
    const Off h = bqh % n_heads;
    const Off b = bqh / (n_heads * n_queries);
    const Off dh = static_cast<Off>(pb.channels);
    const Off row_stride = n_heads * dh;
    const int32_t n_levels = static_cast<int32_t>(pb.levels);
    const int32_t n_points = static_cast<int32_t>(pb.points);
    const T* head_value = value + b * static_cast<Off>(pb.spatial) * row_stride + h * dh + pack * V;
    const float* point_loc = loc + bqh * static_cast<Off>(n_levels * n_points) * 2;
    const float* point_attn = attn + bqh * static_cast<Off>(n_levels * n_points);

    float acc[V];
MSDA_UNROLL
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (int32_t l = 0; l < n_levels; ++l) {
        const Level lv = levels[l];
        const T* level_value = head_value + static_cast<Off>(lv.start) * row_stride;
        for (int32_t p = 0; p < n_points; ++p) {
            const int32_t lp = l * n_points + p;
            const float x = point_loc[2 * lp] * static_cast<float>(lv.w) - 0.5f;
            const float y = point_loc[2 * lp + 1] * static_cast<float>(lv.h) - 0.5f;
            const Corners c = bilinear_corners(x, y, lv.h, lv.w);
            if (c.any) accumulate_point<T, V, Off>(level_value, row_stride, c, point_attn[lp], acc);
        }
    }
    store_pack<T, V>(out + bqh * dh + pack * V, acc);
}

// ---- backward helpers: group reduction and gradient scatter ----------------------------------------------------

// Sum of v over the G lanes of this (b, q, h) group; G is a power of two <= 32 and groups never straddle warps.
// The host build runs one lane per group (G == 1), where the sum is v itself.
MSDA_HD float group_sum(float v, int group) {
#if defined(__CUDA_ARCH__)
    const unsigned lane = threadIdx.x & 31u;
    const unsigned mask = group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (lane & ~static_cast<unsigned>(group - 1)));
    for (int offset = group / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, group);
    return v;
#else
    (void)group;
    return v;
#endif
}

MSDA_HD void atomic_add(float* p, float v) {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);
#else
    *p += v;
#endif
}

// ---- backward: one lane of the group of (b, q, h) ------------------------------------------------------------
//
// grad_value_acc [B, S, H, Dh] float (zeroed by the caller) += attn * w_k * grad_out at every valid corner;
// grad_loc [B, Q, H, L, P, 2] and grad_attn [B, Q, H, L, P] are written (not accumulated) by lane 0 of the group.
// `lane` in [0, group); the lane handles channel packs lane, lane + group, ... < Dh / V.
template <typename T, int V, typename Off>
MSDA_HD void backward_thread(Off bqh, int lane, int group, const Problem& pb, const Level* levels, const T* value,
                             const float* loc, const float* attn, const T* grad_out, float* grad_value_acc,
                             float* grad_loc, float* grad_attn) {
    const Off packs = static_cast<Off>(pb.channels / V);
    const Off n_heads = static_cast<Off>(pb.heads);
    const Off n_queries = static_cast<Off>(pb.queries);
    const Off h = bqh % n_heads;
    const Off b = bqh / (n_heads * n_queries);
    const Off dh = static_cast<Off>(pb.channels);
    const Off row_stride = n_heads * dh;
    const int32_t n_levels = static_cast<int32_t>(pb.levels);
    const int32_t n_points = static_cast<int32_t>(pb.points);
    const Off head_offset = b * static_cast<Off>(pb.spatial) * row_stride + h * dh;  // row 0, channel 0 of (b, h)
    const Off lp_base = bqh * static_cast<Off>(n_levels * n_points);
    const T* head_grad_out = grad_out + bqh * dh;

    for (int32_t l = 0; l < n_levels; ++l) {
        const Level lv = levels[l];
        const Off level_offset = head_offset + static_cast<Off>(lv.start) * row_stride;
        for (int32_t p = 0; p < n_points; ++p) {
            const Off lp = lp_base + l * n_points + p;
            const float x = loc[2 * lp] * static_cast<float>(lv.w) - 0.5f;
            const float y = loc[2 * lp + 1] * static_cast<float>(lv.h) - 0.5f;
            const float a = attn[lp];
            const Corners c = bilinear_corners(x, y, lv.h, lv.w);
            float d_attn = 0.0f, d_x = 0.0f, d_y = 0.0f;  // this lane's share of the sums over channels
            if (c.any) {
                for (Off pack = lane; pack < packs; pack += group) {
                    float g[V];
                    load_pack<T, V>(head_grad_out + pack * V, g);
                    float v[4][V];
MSDA_UNROLL
                    for (int k = 0; k < 4; ++k) {
                        if (c.valid[k]) {
                            load_pack<T, V>(value + level_offset + static_cast<Off>(c.row[k]) * row_stride + pack * V, v[k]);
                            float* dst = grad_value_acc + level_offset + static_cast<Off>(c.row[k]) * row_stride + pack * V;
                            const float coef = a * c.weight[k];
MSDA_UNROLL
                            for (int i = 0; i < V; ++i) atomic_add(dst + i, coef * g[i]);
                        } else {
MSDA_UNROLL
                            for (int i = 0; i < V; ++i) v[k][i] = 0.0f;
                        }
                    }
MSDA_UNROLL
                    for (int i = 0; i < V; ++i) {
                        const float sample = c.weight[0] * v[0][i] + c.weight[1] * v[1][i] + c.weight[2] * v[2][i] +
                                             c.weight[3] * v[3][i];
                        const float dsx = (1.0f - c.fy) * (v[1][i] - v[0][i]) + c.fy * (v[3][i] - v[2][i]);
                        const float dsy = (1.0f - c.fx) * (v[2][i] - v[0][i]) + c.fx * (v[3][i] - v[1][i]);
                        d_attn += g[i] * sample;
                        d_x += g[i] * dsx;
                        d_y += g[i] * dsy;
                    }
                }
            }
            // Every lane of the group reaches these sums for every point (the branch above is uniform per group).
            d_attn = group_sum(d_attn, group);
            d_x = group_sum(d_x, group);
            d_y = group_sum(d_y, group);
            if (lane == 0) {
                grad_attn[lp] = d_attn;
                grad_loc[2 * lp] = a * static_cast<float>(lv.w) * d_x;      // d x_pix / d x_norm = w
                grad_loc[2 * lp + 1] = a * static_cast<float>(lv.h) * d_y;  // d y_pix / d y_norm = h
            }
        }
    }
}

// grad_value[i] = T(grad_value_acc[i]) when T is not float (the float case accumulates in place).
template <typename T, typename Off>
MSDA_HD void convert_element(Off i, const float* src, T* dst) {
    dst[i] = from_float<T>(src[i]);
}

// Smallest power of two >= n, capped at 32: the backward group size for n channel packs.
MSDA_HD int group_size(int64_t packs) {
    int g = 1;
    while (g < 32 && g < packs) g *= 2;
    return g;
}

}  // namespace msda
