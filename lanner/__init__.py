"""lanner: a readable, fast LLM inference engine and server."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `import lanner.kernels` does not pull in the whole engine.
_EXPORTS = {
    "LLM": "lanner.entrypoints.llm",
    "SamplingParams": "lanner.sampling_params",
    "RequestOutput": "lanner.engine.outputs",
    "CompletionOutput": "lanner.engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lanner' has no attribute {name!r}")
