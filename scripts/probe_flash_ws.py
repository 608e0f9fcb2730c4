"""Probe (GPU, sm_90): does Triton warp-specialize a flash-attention loop on Hopper when its descriptors are made on
the device (tl.make_tensor_descriptor) rather than passed from the host? Session 18 asked with host descriptors
(kernels/flash_attention_tma.py) and got the same code back; upstream's Hopper pass wants device descriptors.

A small non-causal flash kernel over contiguous (B, H, tokens, d) tensors seen as (B*H, tokens, d), the head dim as
one chunk zero-filled to a power of two by the copy engine (40 read as 64), `tl.range(..., warp_specialize=WS)` on
its key loop; per config it prints whether the compiled TTGIR holds a warp_specialize op, and the time of CUDA-graph
replays beside SDPA's default backend, each checked against SDPA first.
    python scripts/probe_flash_ws.py [--cases "2,8,4096,40;2,10,4096,64;2,10,16384,64"]
"""
import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from probe_sweep import checked_us, graph_us  # scripts/

CONFIGS = [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2),
           (256, 64, 8, 2), (256, 128, 8, 2)]


@triton.jit
def _flash_fwd(q_ptr, k_ptr, v_ptr, o_ptr, N, Nk, qk_scale, HEAD_DIM: tl.constexpr, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    bh = tl.program_id(1)
    m0 = tl.program_id(0) * BLOCK_M
    rows_q = tl.num_programs(1) * N
    rows_k = tl.num_programs(1) * Nk
    q_desc = tl.make_tensor_descriptor(q_ptr, [rows_q, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, D])
    o_desc = tl.make_tensor_descriptor(o_ptr, [rows_q, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(k_ptr, [rows_k, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(v_ptr, [rows_k, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, D])
    q = q_desc.load([bh * N + m0, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in tl.range(0, Nk, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([bh * Nk + start_n, 0])
        s = tl.dot(q, k.T)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([bh * Nk + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    o_desc.store([bh * N + m0, 0], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="2,8,4096,40;2,10,4096,64;2,10,16384,64", help="B,H,N,d separated by ';'")
    args = p.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; fp16")
    for case in args.cases.split(";"):
        B, H, N, d = (int(v) for v in case.split(","))
        q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
        expected = F.scaled_dot_product_attention(q, k, v)
        sdpa_us = graph_us(lambda: F.scaled_dot_product_attention(q, k, v))
        flops = 4 * B * H * N * N * d
        print(f"B={B},H={H},N={N},d={d}: SDPA {sdpa_us:.1f} us ({flops / sdpa_us / 1e6:.0f} TFLOP/s)", flush=True)
        out = torch.empty_like(q)
        for config in CONFIGS:
            block_m, block_n, warps, stages = config
            for ws in (False, True):
                def run():
                    return _flash_fwd[(triton.cdiv(N, block_m), B * H)](
                        q, k, v, out, N, N, d ** -0.5 * 1.4426950408889634, HEAD_DIM=d,
                        D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block_n, WS=ws, num_warps=warps,
                        num_stages=stages)
                us, note = checked_us(run, out, expected, graph_us)
                specialized = "?"
                if us != float("inf"):
                    specialized = "warp_specialize" in run().asm["ttgir"]
                print(f"  {config} WS={ws!s:5} specialized={specialized!s:5}: {us:8.1f} us "
                      f"({sdpa_us / us:.2f}x SDPA, {flops / us / 1e6:.0f} TFLOP/s) {note}", flush=True)


if __name__ == "__main__":
    main()
