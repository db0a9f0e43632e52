"""Every Triton kernel reads only globals the compiler accepts: constexprs, other jitted
functions and modules. Triton's CPU interpreter (which runs the kernel tests here) accepts
any Python global, so without this check such a kernel passes CI and fails to compile on
the first GPU that runs it (as the one-pass sampler's series bound once did)."""
import ast
import builtins
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest

pytest.importorskip("triton", reason="the kernels need triton (pip install -e \".[test]\")")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import nanovllm.kernels  # noqa: E402

JITTED = (JITFunction, InterpretedFunction)  # the second under TRITON_INTERPRET (CPU runs)
ACCEPTED = (tl.constexpr, types.ModuleType) + JITTED


def jitted_functions():
    for info in pkgutil.iter_modules(nanovllm.kernels.__path__):
        module = importlib.import_module(f"nanovllm.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITTED) and obj.fn.__module__ == module.__name__:
                yield module, name, obj.fn


def global_reads(fn) -> set[str]:
    """Names the function loads that it does not bind itself (arguments, assignments, loops)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    bound = {a.arg for a in tree.args.args}
    bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def test_kernels_read_only_compilable_globals():
    found = list(jitted_functions())
    assert len(found) >= 10  # not vacuous: the kernel modules were found and read
    wrong = [f"{module.__name__}.{name} reads {read} (a {type(vars(module)[read]).__name__})"
             for module, name, fn in found for read in sorted(global_reads(fn))
             if not hasattr(builtins, read) and not isinstance(vars(module).get(read), ACCEPTED)]
    assert not wrong, "make these tl.constexpr(...) or pass them as arguments: " + "; ".join(wrong)
