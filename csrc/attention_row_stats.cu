// Row statistics of attention scores (max and sum of exp) for the partial-softmax path: see attention_row_stats.h.
//
// The plan. A block of kRows warps owns kRows query rows of one (batch, head) and one part of the key range.
// Its query rows sit in shared memory as fp32. The block walks its keys kTileKeys at a time: all threads copy the
// tile's keys into shared memory (fp32, rows padded to an odd stride so that the 32 lanes reading 32 different key
// rows at one column hit 32 different banks), then lane j of warp w computes the score of key j against row w and
// folds it into the lane's running (max, sum of exp). A warp-wide merge gives the row's (max, sum) over the part,
// written as one partial, and a second kernel merges the parts of each row.
#include "attention_row_stats.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace {

constexpr int kRows = 8;          // query rows (warps) per block
constexpr int kTileKeys = 32;     // keys per shared-memory tile: one per lane
constexpr int kMaxD = 256;        // largest head dim: kRows * kMaxD + kTileKeys * (kMaxD + 1) floats < 48 KiB
constexpr int kThreads = kRows * 32;
constexpr int kMergeThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// (m, l) <- the max and sum of exp of two partial (max, sum of exp(x - max)) pairs; -inf maxima contribute 0.
__device__ __forceinline__ void merge(float& m, float& l, float m2, float l2) {
  const float big = fmaxf(m, m2);
  if (big == -INFINITY) return;  // both empty: stays (-inf, 0)
  l = (m == -INFINITY ? 0.f : l * __expf(m - big)) + (m2 == -INFINITY ? 0.f : l2 * __expf(m2 - big));
  m = big;
}

template <typename T, bool kHasMask>
__global__ void __launch_bounds__(kThreads) row_stats_partial(SdkAttentionRowStatsArgs a, int keys_per_split) {
  extern __shared__ float smem[];
  const int D = a.D;
  const int k_pitch = D | 1;  // odd: lane j reads row j at one column, 32 rows land in 32 banks
  float* q_rows = smem;                 // [kRows][D]
  float* k_tile = smem + kRows * D;     // [kTileKeys][k_pitch]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int split = blockIdx.z;
  const int row0 = blockIdx.x * kRows;
  const T* q = static_cast<const T*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1];
  const T* k = static_cast<const T*>(a.k) + b * a.k_strides[0] + h * a.k_strides[1];

  for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
    const int r = i / D, c = i % D;
    const int row = min(row0 + r, a.N - 1);  // rows past N repeat the last; never written
    q_rows[i] = to_float(q[row * a.q_strides[2] + c * a.q_strides[3]]);
  }

  const int row = min(row0 + warp, a.N - 1);
  const T* mask_row = nullptr;
  if (kHasMask) {
    mask_row = static_cast<const T*>(a.mask) + b * a.mask_strides[0] + h * a.mask_strides[1] +
               row * a.mask_strides[2];
  }
  const float* q_row = q_rows + warp * D;
  const int key_begin = split * keys_per_split;
  const int key_end = min(a.Nk, key_begin + keys_per_split);
  float m = -INFINITY, l = 0.f;

  for (int tile = key_begin; tile < key_end; tile += kTileKeys) {
    const int keys = min(kTileKeys, key_end - tile);
    __syncthreads();  // the previous tile is consumed (and, the first time, q_rows is written)
    for (int i = threadIdx.x; i < keys * D; i += kThreads) {
      const int j = i / D, c = i % D;
      k_tile[j * k_pitch + c] = to_float(k[(tile + j) * a.k_strides[2] + c * a.k_strides[3]]);
    }
    __syncthreads();
    if (lane < keys) {
      const float* k_row = k_tile + lane * k_pitch;
      float dot = 0.f;
#pragma unroll 8
      for (int c = 0; c < D; ++c) dot = fmaf(q_row[c], k_row[c], dot);
      float s = dot * a.scale;
      if (kHasMask) s += to_float(mask_row[(tile + lane) * a.mask_strides[3]]);
      merge(m, l, s, 1.f);
    }
  }

#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float l2 = __shfl_xor_sync(0xffffffffu, l, offset);
    merge(m, l, m2, l2);
  }
  if (lane == 0 && row0 + warp < a.N) {
    float* out = a.partials + ((static_cast<long long>(split) * gridDim.y + bh) * a.N + row0 + warp) * 2;
    out[0] = m;
    out[1] = l;
  }
}

__global__ void __launch_bounds__(kMergeThreads) row_stats_merge(const float* partials, float* stats, long long rows,
                                                                 int splits) {
  const long long r = static_cast<long long>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (r >= rows) return;
  float m = -INFINITY, l = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float* p = partials + (s * rows + r) * 2;
    merge(m, l, p[0], p[1]);
  }
  stats[r * 2] = m;
  stats[r * 2 + 1] = l;
}

template <typename T>
cudaError_t launch(const SdkAttentionRowStatsArgs& a, cudaStream_t stream) {
  const int keys_per_split = (a.Nk + a.splits - 1) / a.splits;
  const dim3 grid((a.N + kRows - 1) / kRows, a.B * a.H, a.splits);
  const size_t smem = sizeof(float) * (kRows * a.D + kTileKeys * (a.D | 1));
  if (a.mask != nullptr) {
    row_stats_partial<T, true><<<grid, kThreads, smem, stream>>>(a, keys_per_split);
  } else {
    row_stats_partial<T, false><<<grid, kThreads, smem, stream>>>(a, keys_per_split);
  }
  const long long rows = static_cast<long long>(a.B) * a.H * a.N;
  row_stats_merge<<<static_cast<unsigned>((rows + kMergeThreads - 1) / kMergeThreads), kMergeThreads, 0, stream>>>(
      a.partials, a.stats, rows, a.splits);
  return cudaGetLastError();
}

}  // namespace

const char* sdk_attention_row_stats_why_not(int B, int H, int N, int Nk, int D, int splits, int dtype) {
  if (dtype != SDK_FLOAT32 && dtype != SDK_FLOAT16 && dtype != SDK_BFLOAT16) return "dtype is not fp32, fp16 or bf16";
  if (B < 1 || H < 1 || N < 1 || Nk < 1) return "empty input";
  if (D < 1 || D > kMaxD) return "head dim is not in 1..256";
  if (static_cast<long long>(B) * H > 65535) return "more than 65535 (batch, head) pairs";
  if (splits < 1 || splits > 65535 || splits > Nk) return "splits must be in 1..min(Nk, 65535)";
  if ((static_cast<long long>(N) + kRows - 1) / kRows > 2147483647LL) return "too many query rows";
  return nullptr;
}

cudaError_t sdk_attention_row_stats(const SdkAttentionRowStatsArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case SDK_FLOAT32: return launch<float>(args, stream);
    case SDK_FLOAT16: return launch<__half>(args, stream);
    case SDK_BFLOAT16: return launch<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}
