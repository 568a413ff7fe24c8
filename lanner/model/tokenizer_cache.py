"""Remembers a checkpoint's fast tokenizer as transformers built it, so that a later start
loads it with the tokenizers library alone, without importing transformers.

Importing transformers is most of a tokenizer's load (1.1 s of 1.2 s for the demo model on
a 2-core Xeon), and while the engine builds beside it on the GIL, the H200's warm 8B start
took 5.5-5.7 s instead of 3.1 s without a tokenizer (benchmarks/cold_start.py,
--no-tokenizer-trial: benchmarks/results/20261201-175559-cold-start.json).
transformers' fast tokenizers encode and decode with a Rust ``tokenizers.Tokenizer`` that
they adjust while loading (special tokens added, the post-processor rebuilt, truncation
off); its final form, serialized, is what a start loads back here
(``CachedFastTokenizer``), keyed by the tokenizer files' contents and the transformers and
tokenizers versions. It encodes and decodes as that backend does, which is what
transformers' own plain ``encode``/``decode`` run for these classes; anything else (chat
templates, other methods and arguments) loads the transformers tokenizer on first use and
goes to it. Only the generic Rust-backed classes are remembered (their encode and decode
are the backend's). The cache lives in LANNER_CACHE_DIR (default ~/.cache/lanner), in
its tokenizers folder; LANNER_TOKENIZER_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
# What decides the backend transformers builds: these files of the checkpoint's folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "config.json",
)
# Classes whose encode and decode are the backend's own (transformers' generic fast ones).
REMEMBERED_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def enabled() -> bool:
    """Off with LANNER_TOKENIZER_CACHE=0 (every start then loads through transformers)."""
    return os.environ.get("LANNER_TOKENIZER_CACHE", "1") != "0"


def cache_dir() -> Path:
    """LANNER_CACHE_DIR (default ~/.cache/lanner), its tokenizers folder."""
    root = os.environ.get("LANNER_CACHE_DIR") or Path.home() / ".cache" / "lanner"
    return Path(root) / "tokenizers"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cache_key(model_dir: str | Path) -> str:
    """sha256 of the tokenizer files (names and contents) and the transformers and
    tokenizers versions."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0".encode())
    for package in ("transformers", "tokenizers"):
        digest.update(f"{package}={_version(package)}\0".encode())
    folder = Path(model_dir)
    for name in TOKENIZER_FILES:
        path = folder / name
        content = path.read_bytes() if path.is_file() else b"<none>"
        digest.update(name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / f"{key[:40]}.json"


def remember(model_dir: str | Path, tokenizer: Any) -> bool:
    """Save a loaded transformers tokenizer's backend for ``model_dir``, when its class
    encodes and decodes with the backend alone (else nothing); False (logged) when the
    cache folder is not writable."""
    if not enabled() or type(tokenizer).__name__ not in REMEMBERED_CLASSES:
        return False
    if not getattr(tokenizer, "is_fast", False):
        return False
    if getattr(tokenizer, "split_special_tokens", False):
        return False  # its backend then encodes special tokens as text, per call
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        return False  # transformers' encode would then pad or cut; ours would not
    key = cache_key(model_dir)
    data = {
        "format": CACHE_FORMAT,
        "key": key,
        "class": type(tokenizer).__name__,
        "backend": backend.to_str(),
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
    }
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(data, out)
        os.replace(temporary, path)
    except OSError as err:
        logger.warning("could not write the tokenizer cache %s (%r)", path, err)
        return False
    return True


def load(model_dir: str | Path, load_transformers: Any) -> CachedFastTokenizer | None:
    """The remembered tokenizer of ``model_dir`` (``load_transformers()`` loads the
    transformers one when first needed), or None when none is remembered for its files."""
    if not enabled():
        return None
    key = cache_key(model_dir)
    path = _path(key)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("key") != key:
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(data["backend"])
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - a bad cache file: load the usual way
        logger.warning("tokenizer cache %s is unreadable (%r); ignored", path, err)
        return None
    clean_up = bool(data["clean_up_tokenization_spaces"])
    return CachedFastTokenizer(backend, clean_up, load_transformers)


class CachedFastTokenizer:
    """A transformers fast tokenizer's backend, loaded without transformers: ``encode`` and
    ``decode`` with their plain arguments run on it; any other attribute, method or
    argument goes to the transformers tokenizer, loaded at its first use
    (``transformers_tokenizer``)."""

    # lanner.engine.detokenizer decodes with the backend directly, as for transformers'
    # own Rust-backed classes.
    decodes_in_rust_only = True
    is_fast = True

    def __init__(self, backend: Any, clean_up_spaces: bool, load_transformers: Any) -> None:
        self.backend_tokenizer = backend
        self._clean_up_spaces = clean_up_spaces
        self._load_transformers = load_transformers
        self._transformers: Any = None
        self._lock = threading.Lock()

    @property
    def transformers_tokenizer(self) -> Any:
        """The transformers tokenizer this stands in for (loaded on first use)."""
        with self._lock:
            if self._transformers is None:
                self._transformers = self._load_transformers()
            return self._transformers

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if kwargs or not isinstance(text, str):
            return self.transformers_tokenizer.encode(
                text, add_special_tokens=add_special_tokens, **kwargs
            )
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        plain = isinstance(ids, (list, tuple)) and all(type(i) is int for i in ids)
        if kwargs or self._clean_up_spaces or not plain:  # tensors, arrays, options
            return self.transformers_tokenizer.decode(
                token_ids, skip_special_tokens=skip_special_tokens, **kwargs
            )
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_transformers", "_lock", "_load_transformers"):
            raise AttributeError(name)
        return getattr(self.transformers_tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.transformers_tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.transformers_tokenizer)


def transformers_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer itself (for libraries that check its type)."""
    if isinstance(tokenizer, CachedFastTokenizer):
        return tokenizer.transformers_tokenizer
    return tokenizer
