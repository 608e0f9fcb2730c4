"""Which calls of the CUDA extension's winograd binding crash the process (GPU): each case in its own process.
    python scripts/probe_binding.py            runs every case, one line each
    python scripts/probe_binding.py CASE       runs one"""
import subprocess
import sys

CASES = ["valid", "valid_no_bias", "nchw_x", "channels_12", "u_strided", "group_norm_nchw"]


def run(case):
    import math
    import torch
    from sdkernels import _ext
    from sdkernels.ops import winograd as wg
    ext = _ext.load()
    x = torch.randn(1, 16, 6, 6, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.float16) / math.sqrt(144)
    b = torch.randn(16, device="cuda", dtype=torch.float16)
    out = torch.empty_like(x)
    u = wg.transformed_filter(w)
    print(f"{case}: calling", flush=True)
    try:
        if case == "valid":
            ext.winograd_conv3x3(x, u, b, None, out, 1.0)
        elif case == "valid_no_bias":
            ext.winograd_conv3x3(x, u, None, None, out, 1.0)
        elif case == "nchw_x":
            ext.winograd_conv3x3(x.contiguous(), u, b, None, out, 1.0)
        elif case == "channels_12":
            ext.winograd_conv3x3(x[:, :12], u[:, :12].contiguous(), b, None, out, 1.0)
        elif case == "u_strided":
            ext.winograd_conv3x3(x, u[:, :, :8], b, None, out, 1.0)
        elif case == "group_norm_nchw":
            ext.group_norm_nhwc(x.contiguous(), None, None, None, out, 4, 1e-5, False)
        torch.cuda.synchronize()
        print(f"{case}: returned", flush=True)
    except RuntimeError as e:
        print(f"{case}: raised {str(e)[:160]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        for case in CASES:
            proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, case], capture_output=True,
                                  text=True, timeout=120)
            lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            print(f"[{case}] rc={proc.returncode}: " + " | ".join(lines[-4:]), flush=True)
