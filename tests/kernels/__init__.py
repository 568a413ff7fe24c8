"""Triton kernels against their pure-torch references, in Triton's CPU interpreter."""

from __future__ import annotations

import pytest


def skip_unless_interpreted(kernel: object) -> None:
    """Skip the calling test module when ``kernel`` is not run by the interpreter: Triton
    fixes interpreter mode when it is first imported (its own tl.sum combine functions
    included), so kernels imported earlier cannot be switched to the CPU after the fact.
    (Triton is imported here, not at the top: this package's import must not be the
    first, before a test module sets TRITON_INTERPRET.)"""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set (an earlier test module "
            "imported the engine); export TRITON_INTERPRET=1 to run these CPU kernel tests",
            allow_module_level=True,
        )
