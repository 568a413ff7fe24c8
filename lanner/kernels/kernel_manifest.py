"""Remembers the Triton kernel variants an engine's startup needed (a manifest beside
Triton's cache), so that the next start of the same engine loads exactly those.

Finding the variants is what the ahead-of-time compile pass (``parallel_compile``) runs
the startup's steps for: the 8B shape's warm start spent ~2 s of its 4.4 s (H200,
benchmarks/results/20261201-161347-cold-start.json) running them once, compile-only, at
every CUDA-graph batch size. The manifest is keyed by everything that decides which
variants launch: the caller's identity (model config, dtypes, engine shapes, device),
lanner's own source (kernels and the wrappers that pick their constexprs), and the
torch and Triton versions. A changed key is a different file, so a start with anything
changed runs the pass again and writes its own. A variant the manifest lacks still
compiles at its first launch, as without one (``parallel_compile.refuse_compiles``
keeps that out of a CUDA graph capture). LANNER_KERNEL_MANIFEST=0 turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import triton

logger = logging.getLogger(__name__)

# Bumped when the file's layout changes: an older file is then ignored.
MANIFEST_FORMAT = 1
FILE_PREFIX = "lanner-startup-"
_PACKAGE = Path(__file__).resolve().parents[1]
# The environment switches that change which kernels launch, or how they compile.
KERNEL_SWITCHES = ("LANNER_KERNELS", "LANNER_PDL", "LANNER_SKINNY_PREFETCH", "LANNER_TUNED_CONFIGS")


def enabled() -> bool:
    """Off with LANNER_KERNEL_MANIFEST=0 (every start then runs the compile-only pass)."""
    return os.environ.get("LANNER_KERNEL_MANIFEST", "1") != "0"


@functools.cache
def source_digest() -> str:
    """sha256 over lanner's Python files and shipped JSON (tuned kernel configs), paths
    and contents, the bundled models left out: any change to a kernel or to the code that
    picks its variants gives a new manifest key."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*")):
        relative = path.relative_to(_PACKAGE)
        if path.suffix not in (".py", ".json") or relative.parts[0] == "assets":
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def identity_key(identity: dict[str, Any]) -> str:
    """The manifest's key: the caller's identity with lanner's source, the kernel
    switches set in the environment, and the versions."""
    full = {
        "format": MANIFEST_FORMAT,
        "lanner_source": source_digest(),
        "switches": {name: os.environ.get(name) for name in KERNEL_SWITCHES},
        "torch": torch.__version__,
        "triton": triton.__version__,
        "identity": identity,
    }
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()


def manifest_path(
    identity: dict[str, Any], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the manifest for ``identity`` lives: a file in Triton's cache folder
    (``cache_dir``, default TRITON_CACHE_DIR or ~/.triton/cache), so that emptying the
    cache folder drops the manifests with it."""
    folder = Path(cache_dir if cache_dir is not None else triton.knobs.cache.dir)
    return folder / f"{FILE_PREFIX}{identity_key(identity)[:40]}.json"


@dataclass(frozen=True)
class Variant:
    """One compiled kernel variant: the @triton.jit function (its module and qualified
    name) and Triton's serialized specialization data for it (the JSON its compile hooks
    report, which ``JITFunction.preload`` takes)."""

    module: str
    qualname: str
    specialization: str

    @property
    def cache_key(self) -> str:
        """Triton's in-memory cache key of the variant (its specialization and options)."""
        return str(json.loads(self.specialization)["key"])

    def resolve(self) -> Any | None:
        """The JITFunction this variant belongs to, or None when the module or the
        function is gone (the manifest is then stale)."""
        if "<locals>" in self.qualname:
            return None
        try:
            found: Any = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            return None
        while not hasattr(found, "preload") and hasattr(found, "fn"):  # an Autotuner etc.
            found = found.fn
        return found if hasattr(found, "preload") else None


def read(path: Path, identity: dict[str, Any]) -> list[Variant] | None:
    """The variants a manifest lists, or None when there is none for ``identity`` (no
    file, an unreadable or foreign one)."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT or data.get("key") != identity_key(identity):
            logger.info("kernel manifest %s is for another engine or format; ignored", path)
            return None
        return [Variant(v["module"], v["qualname"], v["specialization"]) for v in data["variants"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("kernel manifest %s is unreadable (%r); ignored", path, err)
        return None


def write(path: Path, identity: dict[str, Any], variants: list[Variant]) -> bool:
    """Write the manifest atomically (a concurrent start reads the old file or the new,
    never half of one); False (logged) when the folder is not writable."""
    data = {
        "format": MANIFEST_FORMAT,
        "key": identity_key(identity),
        "identity": identity,
        "lanner_source": source_digest(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "variants": [
            {"module": v.module, "qualname": v.qualname, "specialization": v.specialization}
            for v in variants
        ],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, default=str)
        os.replace(temporary, path)
    except OSError as err:
        logger.warning("could not write the kernel manifest %s (%r)", path, err)
        return False
    return True


class VariantRecorder:
    """Within, records every kernel variant Triton compiles or loads from its cache into a
    kernel's in-memory cache (its post-compile hook; a hook already set still runs)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], Variant] = {}
        self._lock = threading.Lock()
        self._previous: Any = None

    @property
    def variants(self) -> list[Variant]:
        """What was recorded, in the order first seen."""
        with self._lock:
            return list(self._seen.values())

    def __enter__(self) -> VariantRecorder:
        self._previous = triton.knobs.runtime.jit_post_compile_hook
        triton.knobs.runtime.jit_post_compile_hook = self._record
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        triton.knobs.runtime.jit_post_compile_hook = self._previous

    def _record(self, **info: Any) -> Any:
        function = info["fn"]
        module = getattr(function.module, "__name__", function.module)  # a name, or a module
        variant = Variant(module, function.name, info["compile"]["specialization_data"])
        with self._lock:
            self._seen.setdefault((variant.module, variant.qualname, variant.cache_key), variant)
        return self._previous(**info) if self._previous is not None else None


def same_variants(first: list[Variant], second: list[Variant]) -> bool:
    """Whether two lists hold the same variants, in any order."""

    def keys(variants: list[Variant]) -> set[tuple[str, str, str]]:
        return {(v.module, v.qualname, v.cache_key) for v in variants}

    return keys(first) == keys(second)
