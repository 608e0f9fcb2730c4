"""Which tensors are alive at the peak of a patched VAE decode (1024 px, fp16, channels_last): the allocator's
history (torch.cuda.memory._record_memory_history) replayed to its highest point, the largest live blocks listed
with the innermost sdkernels/diffusers frame that allocated them.
    python scripts/probe_vae_peak.py [--low-memory] [--resolution 1024] [--top 20]"""
import argparse
import collections

import torch

import sdkernels
from sdkernels import models

p = argparse.ArgumentParser()
p.add_argument("--low-memory", action="store_true")
p.add_argument("--resolution", type=int, default=1024)
p.add_argument("--top", type=int, default=20)
args = p.parse_args()

torch.set_grad_enabled(False)
with torch.device("cuda"):
    vae = models.build("vae", init="unit", dtype=torch.float16).to(memory_format=torch.channels_last)
call_args, call_kwargs = models.model_inputs(vae, 1, args.resolution)
sdkernels.patch(vae, low_memory=args.low_memory)
models.model_call(vae, call_args, call_kwargs)  # warm-up: tuning, compiles
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
torch.cuda.memory._record_memory_history(stacks="python", max_entries=200000)
models.model_call(vae, call_args, call_kwargs)
torch.cuda.synchronize()
snapshot = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
print(f"peak above weights and inputs: {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")


def where(frames):
    for f in frames:
        name = f["filename"]
        if "sdkernels" in name or "diffusers" in name:
            return f"{name.split('site-packages/')[-1].split('/work/main/')[-1]}:{f['line']} {f['name']}"
    return frames[0]["filename"] + ":" + str(frames[0]["line"]) if frames else "?"


live, total, best, best_live = {}, 0, -1, {}
for event in snapshot["device_traces"][0]:
    if event["action"] == "alloc":
        live[event["addr"]] = (event["size"], where(event.get("frames", [])))
        total += event["size"]
        if total > best:
            best, best_live = total, dict(live)
    elif event["action"] in ("free_requested",) and event["addr"] in live:
        total -= live.pop(event["addr"])[0]
print(f"peak of this call's allocations: {best / 2**20:.0f} MiB in {len(best_live)} blocks")
by_site = collections.Counter()
for size, site in best_live.values():
    by_site[site] += size
for site, size in by_site.most_common(args.top):
    print(f"{size / 2**20:9.1f} MiB  {site}")
