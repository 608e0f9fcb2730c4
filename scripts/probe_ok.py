"""Exit 0 when every probe line of head dim D (scripts/probe_attention.sh's log on stdin) reports a relative error
of at most 1e-2, none died or met a sanitizer error, and there is at least one:
    python scripts/probe_ok.py 40 < probe.log"""
import re
import sys

dim = sys.argv[1]
# "keys-vector" probes a non-default mask load (VECTOR_MASK_WITH_TWO_CHUNKS): not what the kernel runs by default.
lines = [line for line in sys.stdin if line.startswith(f"[{dim} ") and "keys-vector" not in line]
errors = [float(m.group(1)) for line in lines for m in [re.search(r"worst relative error (\S+)", line)] if m]
lines_ok = bool(errors) and len(errors) == len(lines) and max(errors) <= 1e-2
print(f"probe head dim {dim}: {len(errors)} configs, worst {max(errors, default=float('nan')):.3g} -> "
      f"{'kernel used' if lines_ok else 'stays on the fallback'}")
sys.exit(0 if lines_ok else 1)
