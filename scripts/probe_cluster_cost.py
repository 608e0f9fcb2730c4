"""Probe (GPU, sm_90): what a thread block cluster launch, its barriers and one distributed-shared-memory exchange cost
on their own, without GroupNorm's arithmetic: the fixed cost (~6 us at tiny shapes, session 27) that keeps the
one-kernel CUDA GroupNorm plan (csrc/group_norm_nhwc_cluster.cu) off the small channels_last groups.

One skeleton kernel, compiled here (torch.utils.cpp_extension.load_inline), whose steps are switched on one by one:
  wait      griddepcontrol.wait first (as the real kernel, a programmatic dependent; launched with the attribute)
  load      each thread loads `rows` 16-byte vectors (the real kernel's registers-held rows)
  barrier   one cluster barrier (arrive + wait)
  exchange  warp 0's lanes read a float4 from each block of the cluster (mapa + ld.shared::cluster), a second arrive
            before the stores and its wait at the end (the real kernel's one exchange)
  store     the loaded vectors written back out
Each variant is timed as a CUDA graph of back-to-back launches (do_bench's median of replays, per launch), next to the real op
at the same shape where one is named.

    python scripts/probe_cluster_cost.py [--geometry 132,256,8,1;264,256,8,2] [--shape 2,1280,8,8]
    python scripts/probe_cluster_cost.py --print-source > /tmp/probe.cu   (compile check: nvcc -arch=sm_90 -c)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SOURCE = r"""
#include <cuda_runtime.h>
#include <cstdint>

enum : int { kWait = 1, kLoad = 2, kBarrier = 4, kExchange = 8, kStore = 16 };

__global__ void __launch_bounds__(512, 1) cluster_skeleton(const uint4* __restrict__ x, uint4* __restrict__ out,
                                                           int rows, long long step, int cluster, int flags) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ float4 slot[32];
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (flags & kWait) asm volatile("griddepcontrol.wait;" ::: "memory");
  uint4 v[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) v[u] = make_uint4(0u, 0u, 0u, 0u);
  if (flags & kLoad) {
#pragma unroll
    for (int u = 0; u < 8; ++u)
      if (u < rows) v[u] = __ldg(x + first + u * step);
  }
  if (threadIdx.x < 32) slot[threadIdx.x] = make_float4(float(threadIdx.x), 0.f, 0.f, 0.f);
  if (flags & (kBarrier | kExchange)) {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
  }
  unsigned int seen = 0u;
  if (flags & kExchange) {
    if (threadIdx.x < cluster) {
      const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(slot + threadIdx.x));
      uint32_t remote;
      float f;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"((int)threadIdx.x));
      asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(f) : "r"(remote) : "memory");
      seen = __float_as_uint(f) & 1u;
    }
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  }
  if (flags & kStore) {
#pragma unroll
    for (int u = 0; u < 8; ++u)
      if (u < rows) out[first + u * step] = make_uint4(v[u].x ^ seen, v[u].y, v[u].z, v[u].w);
  }
  if (flags & kExchange) asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

int launch_skeleton(const void* x, void* out, int blocks, int threads, int cluster, int rows, int flags, int pdl,
                    void* stream) {
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(threads);
  cfg.stream = static_cast<cudaStream_t>(stream);
  cfg.attrs = attr;
  cfg.numAttrs = n;
  const long long step = (long long)blocks * threads;
  return (int)cudaLaunchKernelEx(&cfg, cluster_skeleton, static_cast<const uint4*>(x), static_cast<uint4*>(out), rows,
                                 step, cluster, flags);
}
"""

BINDING = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
int launch_skeleton(const void* x, void* out, int blocks, int threads, int cluster, int rows, int flags, int pdl,
                    void* stream);
void run(torch::Tensor x, torch::Tensor out, int64_t blocks, int64_t threads, int64_t cluster, int64_t rows,
         int64_t flags, int64_t pdl) {
  TORCH_CHECK(x.numel() * x.element_size() >= blocks * threads * rows * 16, "x too small for the geometry");
  const int err = launch_skeleton(x.data_ptr(), out.data_ptr(), (int)blocks, (int)threads, (int)cluster, (int)rows,
                                  (int)flags, (int)pdl, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "launch failed: cudaError ", err);
}
"""

FLAGS = {"wait": 1, "load": 2, "barrier": 4, "exchange": 8, "store": 16}
VARIANTS = [  # (name, steps): each adds to the one before, up to the real kernel's skeleton
    ("empty", ()),
    ("wait", ("wait",)),
    ("load+store", ("wait", "load", "store")),
    ("barrier", ("wait", "barrier")),
    ("barrier+exchange", ("wait", "barrier", "exchange")),
    ("load+barrier+exchange+store", ("wait", "load", "barrier", "exchange", "store")),
]


def graph_us(fn, launches=20):
    """Per launch: the median (do_bench) of CUDA-graph replays of `launches` back-to-back calls."""
    from sdkernels.benchmarking import bench_ms
    return bench_ms(lambda: [fn() for _ in range(launches)], graph=True) * 1e3 / launches


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--geometry", default="64,256,1,1;64,256,8,1;128,256,8,2;264,256,8,2;264,512,8,4;132,128,4,1",
                   help="blocks,threads,cluster,rows;... (cluster 1: launched without the cluster attribute)")
    p.add_argument("--shape", default="2,1280,8,8", help="N,C,H,W of a channels_last fp16 GroupNorm+SiLU timed as "
                   "the real op beside (triton tile, CUDA one kernel, CUDA two kernels); empty: none")
    p.add_argument("--print-source", action="store_true", help="print the CUDA source and exit")
    args = p.parse_args()
    if args.print_source:
        print(SOURCE)
        return
    import torch
    from torch.utils.cpp_extension import load_inline
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    ext = load_inline("probe_cluster_cost", cpp_sources=BINDING, cuda_sources=SOURCE, functions=["run"],
                      extra_cuda_cflags=["-O3"])
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    x = torch.randn(64 << 20, device="cuda", dtype=torch.float16)  # 128 MiB: every geometry's rows fit
    out = torch.empty_like(x)
    head = f"{'blocks,threads,cluster,rows':28s}" + "".join(f"{name:>30s}" for name, _ in VARIANTS)
    print("us per launch (do_bench of CUDA-graph replays of 20 launches)\n" + head)
    for spec in args.geometry.split(";"):
        blocks, threads, cluster, rows = (int(v) for v in spec.split(","))
        cells = []
        for _, steps in VARIANTS:
            flags = sum(FLAGS[s] for s in steps)
            pdl = int("wait" in steps)
            cells.append(graph_us(lambda: ext.run(x, out, blocks, threads, cluster, rows, flags, pdl)))
        print(f"{spec:28s}" + "".join(f"{us:30.2f}" for us in cells))
    if args.shape:
        real_op(torch, tuple(int(v) for v in args.shape.split(",")))


def real_op(torch, shape):
    import sdkernels
    from sdkernels.dispatch import use_backend
    x = torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w, b = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
    for label, backend, knob in (("triton tile", "triton", None), ("cuda one kernel", "cuda", None),
                                 ("cuda two kernels", "cuda", "0")):
        if knob is None:
            os.environ.pop("SDKERNELS_GN_CLUSTER", None)
        else:
            os.environ["SDKERNELS_GN_CLUSTER"] = knob

        def call():
            with use_backend(backend, op="group_norm", strict=True):
                sdkernels.group_norm(x, 32, w, b, 1e-5, True)
        print(f"{'x'.join(map(str, shape))} channels_last {label}: {graph_us(call):.2f} us per call")
    os.environ.pop("SDKERNELS_GN_CLUSTER", None)


if __name__ == "__main__":
    main()
