// Device helpers of the two Winograd F(2x2, 3x3) kernels (winograd_conv3x3.cu: WMMA, V through shared memory;
// winograd_conv3x3_mma.cu: mma.sync, V built in registers): element types, the transforms, tile coordinates,
// cp.async copies. Included by those .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "winograd_conv3x3.h"

namespace sdk_winograd {

// ---- element types ----------------------------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kLanes = 1;  // elements per 4-byte word
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static float get(uint32_t w, int) { return __uint_as_float(w); }
  __device__ static uint32_t set(uint32_t, int, float v) { return __float_as_uint(v); }
};

// A 16-bit type: lane 0 is the low half of the word (the lower address).
template <typename T>
struct Elem16 {
  static constexpr int kLanes = 2;
  __device__ static float get(uint32_t w, int lane) {
    return Elem<T>::to_float(Elem<T>::from_bits((unsigned short)(lane ? w >> 16 : w & 0xffffu)));
  }
  __device__ static uint32_t set(uint32_t w, int lane, float v) {
    const uint32_t bits = Elem<T>::to_bits(Elem<T>::from_float(v));
    return lane ? (w & 0xffffu) | (bits << 16) : (w & 0xffff0000u) | bits;
  }
};

template <>
struct Elem<__half> : Elem16<__half> {
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static __half from_bits(unsigned short b) { return __ushort_as_half(b); }
  __device__ static uint32_t to_bits(__half v) { return __half_as_ushort(v); }
};

template <>
struct Elem<__nv_bfloat16> : Elem16<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 from_bits(unsigned short b) { return __ushort_as_bfloat16(b); }
  __device__ static uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};

// ---- the transforms (sdkernels/ops/winograd.py: B_T, A_T) -------------------------------------------------------

// d (4x4, row-major) <- B^T d B, in place.
__device__ __forceinline__ void input_transform(float* d) {
#pragma unroll
  for (int col = 0; col < 4; ++col) {  // B^T d: combine rows
    const float r0 = d[col], r1 = d[4 + col], r2 = d[8 + col], r3 = d[12 + col];
    d[col] = r0 - r2;
    d[4 + col] = r1 + r2;
    d[8 + col] = r2 - r1;
    d[12 + col] = r1 - r3;
  }
#pragma unroll
  for (int row = 0; row < 4; ++row) {  // (B^T d) B: combine columns
    float* r = d + 4 * row;
    const float c0 = r[0], c1 = r[1], c2 = r[2], c3 = r[3];
    r[0] = c0 - c2;
    r[1] = c1 + c2;
    r[2] = c2 - c1;
    r[3] = c1 - c3;
  }
}

// y (2x2, row-major) = A^T m A of m (4x4, row-major).
__device__ __forceinline__ void output_transform(const float* m, float* y) {
  float t0[4], t1[4];  // A^T m
#pragma unroll
  for (int col = 0; col < 4; ++col) {
    t0[col] = m[col] + m[4 + col] + m[8 + col];
    t1[col] = m[4 + col] - m[8 + col] - m[12 + col];
  }
  y[0] = t0[0] + t0[1] + t0[2];
  y[1] = t0[1] - t0[2] - t0[3];
  y[2] = t1[0] + t1[1] + t1[2];
  y[3] = t1[1] - t1[2] - t1[3];
}

// Element offset of pixel (n, h, w) through (n, h, w) strides; 32 bits suffice (the launcher checks).
__device__ __forceinline__ int offset(const long long* strides, int n, int h, int w) {
  return n * (int)strides[0] + h * (int)strides[1] + w * (int)strides[2];
}

struct TileCoords {
  int n, th, tw;
};

__device__ __forceinline__ TileCoords tile_coords(int tile, int tiles_w, int tiles_per_image) {
  TileCoords c;
  c.n = tile / tiles_per_image;
  const int r = tile - c.n * tiles_per_image;
  c.th = r / tiles_w;
  c.tw = r - c.th * tiles_w;
  return c;
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid (nothing is read then).
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
  const unsigned dst_shared = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_shared), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copies_issued() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void copies_landed() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// All but the newest kPending groups of this thread's copies have landed.
template <int kPending>
__device__ __forceinline__ void copies_landed_but() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// The epilogue of one tile and output channel k, shared by both kernels: y = A^T m A of its 16 M values, then the
// (up to) 4 pixels inside the image written as (y + bias[k] [+ residual]) * scale, rounded to T.
template <typename T>
__device__ __forceinline__ void store_tile(const SdkWinogradConv3x3Args& a, const float* m, int n, int th, int tw,
                                           int k) {
  const T* bias = static_cast<const T*>(a.bias);
  const T* residual = static_cast<const T*>(a.residual);
  T* out = static_cast<T*>(a.out);
  float y[4];
  output_transform(m, y);
  const float b = bias != nullptr ? Elem<T>::to_float(bias[k]) : 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int h = 2 * th + i / 2, w = 2 * tw + i % 2;
    if (h >= a.H || w >= a.W) continue;
    float v = y[i] + b;
    if (residual != nullptr) v += Elem<T>::to_float(residual[offset(a.residual_strides, n, h, w) + k]);
    out[offset(a.out_strides, n, h, w) + k] = Elem<T>::from_float(v * a.scale);
  }
}

// Whether every element offset of an (N, H, W, C) tensor through (n, h, w) strides (channel stride 1) fits in int.
inline bool offsets_fit(const long long* strides, int N, int H, int W, int C) {
  const long long last = (N - 1) * strides[0] + (H - 1) * strides[1] + (W - 1) * strides[2] + (C - 1);
  return strides[0] >= 0 && strides[1] >= 0 && strides[2] >= 0 && last < INT_MAX;
}

// Whether x, out and residual (where given) of these arguments are addressed within 32-bit offsets.
inline bool args_offsets_fit(const SdkWinogradConv3x3Args& a) {
  return offsets_fit(a.x_strides, a.N, a.H, a.W, a.C) && offsets_fit(a.out_strides, a.N, a.H, a.W, a.K) &&
         (a.residual == nullptr || offsets_fit(a.residual_strides, a.N, a.H, a.W, a.K));
}

}  // namespace sdk_winograd
