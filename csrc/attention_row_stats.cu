// Row statistics of attention scores (max and sum of exp) for the partial-softmax path: see attention_row_stats.h.
//
// fp16 and bf16 on sm_80+: the tensor-core plan. A block of 4 warps owns kMmaRows query rows of one (batch, head)
// and one part of the key range; the query tile sits in shared memory (head dim zero-padded to a multiple of 16).
// The block walks its keys kMmaKeys at a time: all threads copy the key tile into shared memory (16-byte vectors
// where the strides allow), each warp multiplies its 16 query rows by the tile's keys with WMMA 16x16x16 (fp32
// accumulators) and stores its 16 x kMmaKeys scores to shared memory, and two lanes per row fold them into running
// (max, sum of exp2) pairs in the log2 domain. The pairs merge across the two lanes and are written as one partial.
//
// fp32, and older GPUs: the scalar plan. A block of kRows warps owns kRows query rows of one (batch, head) and one
// part of the key range.
// Its query rows sit in shared memory as fp32. The block walks its keys kTileKeys at a time: all threads copy the
// tile's keys into shared memory (fp32, rows padded to an odd stride so that the 32 lanes reading 32 different key
// rows at one column hit 32 different banks), then lane j of warp w computes the score of key j against row w and
// folds it into the lane's running (max, sum of exp). A warp-wide merge gives the row's (max, sum) over the part,
// written as one partial, and a second kernel merges the parts of each row.
#include "attention_row_stats.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

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

// ---- the tensor-core plan (fp16, bf16; sm_80+) ----------------------------------------------------------------

constexpr int kMmaWarps = 4;
constexpr int kMmaRows = 16 * kMmaWarps;  // query rows per block: 16 per warp, one WMMA row tile
constexpr int kMmaKeys = 64;              // keys per shared-memory tile: 4 WMMA column tiles
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kScorePitch = kMmaKeys + 4; // fp32 scores; lanes (row r, key parity p) read bank 4r + p + 2j: 2-way
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int padded_dim(int D) { return (D + 15) / 16 * 16; }
__host__ __device__ constexpr int tile_pitch(int D) { return padded_dim(D) + 8; }  // 16-byte rows, banks shifted
constexpr size_t mma_smem_bytes(int D) {
  return sizeof(uint16_t) * 2 * kMmaRows * tile_pitch(D) + sizeof(float) * kMmaRows * kScorePitch;
}

// rows x padded_dim(D) of a (token, d) matrix at src into dst (pitch tile_pitch(D)): token r0 + i (clamped to
// last), columns past D zero. kVec: 8 elements per 16-byte load (d stride 1, D and the token stride multiples of 8,
// src 16-byte aligned: the launcher checks).
template <typename T, bool kVec>
__device__ void load_tile(T* dst, const T* src, long long token_stride, long long d_stride, int r0, int last, int D,
                          int rows) {
  const int dp = padded_dim(D), pitch = tile_pitch(D);
  if (kVec) {
    const int vecs = dp / 8;
    for (int i = threadIdx.x; i < rows * vecs; i += kMmaThreads) {
      const int r = i / vecs, c = (i % vecs) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (c < D) v = *reinterpret_cast<const uint4*>(src + min(r0 + r, last) * token_stride + c);
      *reinterpret_cast<uint4*>(dst + r * pitch + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < rows * dp; i += kMmaThreads) {
      const int r = i / dp, c = i % dp;
      dst[r * pitch + c] = c < D ? src[min(r0 + r, last) * token_stride + c * d_stride] : T();  // T() is zero
    }
  }
}

template <typename T, bool kHasMask, bool kVec>
__global__ void __launch_bounds__(kMmaThreads) row_stats_partial_mma(SdkAttentionRowStatsArgs a, int keys_per_split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the launcher sends older devices to the scalar plan
#else
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(16) unsigned char mma_smem[];
  const int D = a.D, pitch = tile_pitch(D), ksteps = padded_dim(D) / 16;
  T* q_tile = reinterpret_cast<T*>(mma_smem);      // [kMmaRows][pitch]
  T* k_tile = q_tile + kMmaRows * pitch;           // [kMmaKeys][pitch]
  float* scores = reinterpret_cast<float*>(k_tile + kMmaKeys * pitch);  // [kMmaRows][kScorePitch]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int row0 = blockIdx.x * kMmaRows;
  const T* q = static_cast<const T*>(a.q) + b * a.q_strides[0] + h * a.q_strides[1];
  const T* k = static_cast<const T*>(a.k) + b * a.k_strides[0] + h * a.k_strides[1];
  load_tile<T, kVec>(q_tile, q, a.q_strides[2], a.q_strides[3], row0, a.N - 1, D, kMmaRows);

  // Lane (r, p) folds the scores of row warp*16 + r at keys of parity p; rows past N repeat the last, never written.
  const int r = lane / 2, parity = lane % 2;
  const int row = min(row0 + warp * 16 + r, a.N - 1);
  const T* mask_row = nullptr;
  if (kHasMask) {
    mask_row = static_cast<const T*>(a.mask) + b * a.mask_strides[0] + h * a.mask_strides[1] +
               row * a.mask_strides[2];
  }
  const float* my_scores = scores + (warp * 16 + r) * kScorePitch;
  const float scale2 = a.scale * kLog2e;
  const int key_begin = blockIdx.z * keys_per_split;
  const int key_end = min(a.Nk, key_begin + keys_per_split);
  float m = -INFINITY, l = 0.f;  // log2 domain: l = sum of exp2(s2 - m)

  for (int tile = key_begin; tile < key_end; tile += kMmaKeys) {
    const int keys = min(kMmaKeys, key_end - tile);
    __syncthreads();  // every warp is done with the previous key tile
    load_tile<T, kVec>(k_tile, k, a.k_strides[2], a.k_strides[3], tile, key_end - 1, D, kMmaKeys);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMmaKeys / 16];
#pragma unroll
    for (int j = 0; j < kMmaKeys / 16; ++j) wmma::fill_fragment(acc[j], 0.f);
    for (int kk = 0; kk < ksteps; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa;
      wmma::load_matrix_sync(qa, q_tile + warp * 16 * pitch + kk * 16, pitch);
#pragma unroll
      for (int j = 0; j < kMmaKeys / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;  // k_tile rows are the columns of k^T
        wmma::load_matrix_sync(kb, k_tile + j * 16 * pitch + kk * 16, pitch);
        wmma::mma_sync(acc[j], qa, kb, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kMmaKeys / 16; ++j) {
      wmma::store_matrix_sync(scores + warp * 16 * kScorePitch + j * 16, acc[j], kScorePitch, wmma::mem_row_major);
    }
    __syncwarp();
    float s2[kMmaKeys / 2];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kMmaKeys / 2; ++j) {
      const int key = 2 * j + parity;
      s2[j] = my_scores[key] * scale2;
      if (kHasMask) s2[j] += to_float(mask_row[(tile + min(key, keys - 1)) * a.mask_strides[3]]) * kLog2e;
      if (key >= keys) s2[j] = -INFINITY;
      tile_max = fmaxf(tile_max, s2[j]);
    }
    const float m_new = fmaxf(m, tile_max);
    if (m_new != -INFINITY) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kMmaKeys / 2; ++j) sum += exp2f(s2[j] - m_new);
      l = (m == -INFINITY ? 0.f : l * exp2f(m - m_new)) + sum;
      m = m_new;
    }
  }

  const float m2 = __shfl_xor_sync(0xffffffffu, m, 1), l2 = __shfl_xor_sync(0xffffffffu, l, 1);
  const float big = fmaxf(m, m2);
  if (big != -INFINITY) {
    l = (m == -INFINITY ? 0.f : l * exp2f(m - big)) + (m2 == -INFINITY ? 0.f : l2 * exp2f(m2 - big));
  }
  if (parity == 0 && row0 + warp * 16 + r < a.N) {
    float* out = a.partials + ((static_cast<long long>(blockIdx.z) * gridDim.y + bh) * a.N + row0 + warp * 16 + r) * 2;
    out[0] = big * kLn2;  // natural units, like the scalar plan's
    out[1] = l;
  }
#endif
}

// Whether the 16-byte vector loads of load_tile apply to both q and k.
bool vector_loads(const SdkAttentionRowStatsArgs& a) {
  const auto ok = [&](const void* p, const long long* st) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && st[3] == 1 && st[0] % 8 == 0 && st[1] % 8 == 0 &&
           st[2] % 8 == 0;
  };
  return a.D % 8 == 0 && ok(a.q, a.q_strides) && ok(a.k, a.k_strides);
}

template <typename T, bool kHasMask, bool kVec>
cudaError_t launch_mma(const SdkAttentionRowStatsArgs& a, int keys_per_split, cudaStream_t stream) {
  const auto kernel = row_stats_partial_mma<T, kHasMask, kVec>;
  // Dynamic shared memory above 48 KiB must be opted into, once per kernel and device (before any graph capture:
  // the first call of a signature runs eagerly). A static of this function is one per kernel.
  static bool smem_allowed[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess && (dev >= 64 || !smem_allowed[dev])) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mma_smem_bytes(kMaxD));
    if (err == cudaSuccess && dev < 64) smem_allowed[dev] = true;
  }
  if (err != cudaSuccess) return err;
  const dim3 grid((a.N + kMmaRows - 1) / kMmaRows, a.B * a.H, a.splits);
  kernel<<<grid, kMmaThreads, mma_smem_bytes(a.D), stream>>>(a, keys_per_split);
  return cudaGetLastError();
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
  cudaError_t err = cudaSuccess;
  bool scalar = true;
  if constexpr (!std::is_same<T, float>::value) {
    if (sdk_device_major() >= 8) {
      scalar = false;
      const bool vec = vector_loads(a), masked = a.mask != nullptr;
      err = masked ? (vec ? launch_mma<T, true, true>(a, keys_per_split, stream)
                          : launch_mma<T, true, false>(a, keys_per_split, stream))
                   : (vec ? launch_mma<T, false, true>(a, keys_per_split, stream)
                          : launch_mma<T, false, false>(a, keys_per_split, stream));
    }
  }
  if (scalar) {
    const dim3 grid((a.N + kRows - 1) / kRows, a.B * a.H, a.splits);
    const size_t smem = sizeof(float) * (kRows * a.D + kTileKeys * (a.D | 1));
    if (a.mask != nullptr) {
      row_stats_partial<T, true><<<grid, kThreads, smem, stream>>>(a, keys_per_split);
    } else {
      row_stats_partial<T, false><<<grid, kThreads, smem, stream>>>(a, keys_per_split);
    }
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return err;
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
