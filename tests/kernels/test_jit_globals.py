"""Triton's compiler rejects a @triton.jit function that reads a plain module global
(only tl.constexpr globals, other jit functions and modules are allowed), but the CPU
interpreter CI runs accepts it, so such a bug would first show on the GPU. This test
reads every kernel module's jit functions and checks what they name."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest
import triton
import triton.language as tl

import lanner.kernels

# Under TRITON_INTERPRET=1, @triton.jit gives an InterpretedFunction, not a JITFunction.
KERNEL_TYPES = (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction)


def kernel_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(lanner.kernels.__path__, "lanner.kernels.")]


@pytest.mark.parametrize("module_name", kernel_modules())
def test_jit_functions_read_only_constexpr_globals(module_name: str) -> None:
    module = importlib.import_module(module_name)
    tree = ast.parse(inspect.getsource(module))
    offenders = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        if not isinstance(getattr(module, node.name, None), KERNEL_TYPES):
            continue
        # The body only: decorator arguments are evaluated by Python, not compiled.
        names = [n for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Name)]
        local = {a.arg for a in node.args.args}
        local |= {n.id for n in names if isinstance(n.ctx, ast.Store)}
        for name in {n.id for n in names} - local:
            if name not in vars(module):
                continue  # a builtin (range, float, ...)
            value = vars(module)[name]
            if not (isinstance(value, (tl.constexpr, *KERNEL_TYPES)) or inspect.ismodule(value)):
                offenders.append(f"{node.name} reads {name} = {value!r}")
    assert not offenders, offenders
