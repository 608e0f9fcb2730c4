"""Rules of the GPU compiler that Triton's interpreter does not enforce, checked on the kernel sources in the CPU
lane so that CI catches them before a GPU run does."""
import ast
from pathlib import Path

import pytest

KERNELS = sorted((Path(__file__).resolve().parent.parent / "kernels").glob("*.py"))


def _jit_functions(tree):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def _plain_globals(tree) -> set:
    """Module-level names bound to something other than tl.constexpr(...) (assignments and imported names)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            constexpr = isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith("constexpr")
            if not constexpr:
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _imported_plain_globals(tree) -> set:
    """Names imported from sibling kernel modules that are plain (not constexpr) globals there."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            source = KERNELS[0].parent / f"{node.module}.py"
            if source.exists():
                plain = _plain_globals(ast.parse(source.read_text()))
                names |= {a.asname or a.name for a in node.names if a.name in plain}
    return names


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_kernels_read_only_constexpr_globals(path):
    """Triton 3.3+ refuses, when compiling for a GPU, a @triton.jit function that reads a global not declared
    tl.constexpr (the interpreter lets it pass)."""
    tree = ast.parse(path.read_text())
    plain = _plain_globals(tree) | _imported_plain_globals(tree)
    bad = []
    for fn in _jit_functions(tree):
        local = {a.arg for a in fn.args.args} | {n.id for n in ast.walk(fn)
                                                  if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        bad += [f"{fn.name} reads {name}" for name in sorted((used & plain) - local)]
    assert not bad, f"{path.name}: @triton.jit code reads non-constexpr globals: {', '.join(bad)}"
