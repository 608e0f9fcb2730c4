"""The CUDA C++ sources compile, warning-free and without register spills, on a machine with nvcc and no GPU (CI).

Every csrc/*.cu is compiled with ``nvcc -c`` for sm_80 and sm_90 under the flags torch.utils.cpp_extension adds
(``__CUDA_NO_HALF_CONVERSIONS__`` and friends), and its ``ptxas -v`` report is checked for spills; csrc/binding.cpp
is compiled against this torch's headers (a CPU wheel works: the binding needs only the CUDA runtime headers),
and each ``sdk_*`` launcher it calls must be defined by some .cu file. All compiles start at once (module fixture)
so the file takes the time of the slowest one. ``pytest -s`` prints the registers of every kernel.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
BINDING = CSRC / "binding.cpp"


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)")

ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# What torch.utils.cpp_extension passes to nvcc: kernels must convert half/bfloat16 with explicit intrinsics.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
WARNINGS_AS_ERRORS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def _cu_command(source: Path, obj: Path) -> list:
    return [NVCC, "-c", str(source), "-o", str(obj), "-std=c++17", "-O3", "--use_fast_math", "--threads", "2",
            "-I", str(CSRC), "-Xptxas", "-v", *ARCHS, *TORCH_NVCC_DEFINES, *WARNINGS_AS_ERRORS]


def _binding_command(obj: Path):
    """The host-compiler command for binding.cpp, or (None, reason) when this machine cannot build it."""
    import torch.utils.cpp_extension as cpp
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return None, "no host C++ compiler"
    homes = [os.environ.get("CUDA_HOME"), cpp.CUDA_HOME, Path(NVCC).resolve().parents[1], "/usr/local/cuda"]
    includes_found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not includes_found:
        return None, f"no cuda_runtime_api.h under any of {homes}"
    cuda_include = includes_found[0]
    includes = [*cpp.include_paths(), sysconfig.get_paths()["include"], str(cuda_include), str(CSRC)]
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    torch_include = Path(cpp.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU wheel lacks this generated header
    return [cxx, "-c", str(BINDING), "-o", str(obj), "-std=c++17", "-O0", "-fPIC", "-Wall", "-Wextra", "-Werror",
            *defines, *(f"-I{p}" if p == str(CSRC) else f"-isystem{p}" for p in includes)], None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{source name: (returncode, output, object path)} for every source; None for one that cannot be built."""
    out_dir = tmp_path_factory.mktemp("csrc_build")
    jobs, results = {}, {}
    for source in CU_SOURCES:
        obj = out_dir / (source.stem + ".o")
        jobs[source.name] = (subprocess.Popen(_cu_command(source, obj), stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True), obj)
    if BINDING.exists():
        cmd, why = _binding_command(out_dir / "binding.o")
        if cmd is None:
            results[BINDING.name] = why
        else:
            jobs[BINDING.name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                                  out_dir / "binding.o")
    for name, (proc, obj) in jobs.items():
        output, _ = proc.communicate(timeout=600)
        results[name] = (proc.returncode, output, obj)
    return results


def ptxas_report(output: str) -> list:
    """[(kernel, arch, registers, spill store bytes, spill load bytes, stack bytes)] from ``-Xptxas -v``."""
    rows, current = [], None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = [m.group(1), m.group(2), 0, 0, 0, 0]
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            current[5], current[3], current[4] = (int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            current[2] = int(m.group(1))
            rows.append(tuple(current))
            current = None
    return rows


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return list(names)
    return subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")


@needs_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_without_spills(source, builds):
    returncode, output, _ = builds[source.name]
    assert returncode == 0, f"nvcc failed on {source.name}:\n{output[-6000:]}"
    report = ptxas_report(output)
    assert report, f"no ptxas report for {source.name} (no kernels?):\n{output[-2000:]}"
    names = _demangle([r[0] for r in report])
    print(f"\n{source.name}: registers per kernel")
    for name, (_, arch, regs, st, ld, stack) in zip(names, report):
        print(f"  {arch} {regs:3d} regs, stack {stack} B, spills {st}/{ld} B  {name[:110]}")
    spilling = [f"{arch} {name}: {st} B stored, {ld} B loaded"
                for name, (_, arch, _, st, ld, _) in zip(names, report) if st or ld]
    assert not spilling, "register spills (local memory traffic in a memory-bound kernel):\n" + "\n".join(spilling)


@needs_nvcc
@pytest.mark.skipif(not BINDING.exists(), reason="no csrc/binding.cpp")
def test_binding_compiles_and_finds_its_launchers(builds):
    result = builds[BINDING.name]
    if isinstance(result, str):
        pytest.skip(f"cannot compile binding.cpp here: {result}")
    returncode, output, obj = result
    assert returncode == 0, f"compiling binding.cpp against torch's headers failed:\n{output[-6000:]}"
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to compare the binding's symbols with the .cu objects")

    def symbols(path, flag):
        lines = subprocess.run([nm, flag, str(path)], capture_output=True, text=True, check=True).stdout
        return {line.split()[-1] for line in lines.splitlines() if line.strip()}

    wanted = {s for s in symbols(obj, "-u") if "sdk_" in s}
    defined = set()
    for source in CU_SOURCES:
        returncode, _, cu_obj = builds[source.name]
        assert returncode == 0, f"{source.name} did not compile"
        defined |= symbols(cu_obj, "--defined-only")
    missing = sorted(wanted - defined)
    assert not missing, ("binding.cpp calls launchers that no .cu defines (signature changed?): "
                         + ", ".join(_demangle(missing)))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q"]))
