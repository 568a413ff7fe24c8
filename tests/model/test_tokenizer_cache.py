"""model/tokenizer_cache.py: a fast tokenizer loaded once through transformers is
remembered, and the next load reads its backend back without transformers; it encodes and
decodes exactly as the transformers tokenizer does, hands everything else to it (loaded
then), and is not used for other tokenizer files, versions, or with the cache off."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lanner.model import tokenizer_cache
from lanner.model.tokenizer import load_tokenizer
from lanner.model.tokenizer_cache import CachedFastTokenizer

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "lanner" / "assets" / "demo-model"
TEXTS = [
    "",
    "Hello world",
    " leading space and  double  spaces",
    "ünïcödé → 中文 and emoji 🙂",
    "<|endoftext|> special <|user|>inside<|assistant|> text",
    "tabs\tand\nnew lines\n\n",
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LANNER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _checkpoints(tiny_model_dirs: dict[str, Path]) -> list[Path]:
    return [DEMO, *tiny_model_dirs.values()]


def test_remembered_tokenizer_encodes_and_decodes_as_transformers(
    cache: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    rng = random.Random(0)
    remembered = []
    for folder in _checkpoints(tiny_model_dirs):
        reference = load_tokenizer(folder)  # through transformers, and remembered
        assert not isinstance(reference, CachedFastTokenizer)
        cached = load_tokenizer(folder)
        if type(reference).__name__ not in tokenizer_cache.REMEMBERED_CLASSES:
            # A class with encode or decode of its own (Qwen2Tokenizer): never remembered.
            assert type(cached) is type(reference), folder
            continue
        assert isinstance(cached, CachedFastTokenizer), folder
        remembered.append(folder.name)
        for text in TEXTS:
            for special in (True, False):
                assert cached.encode(text, add_special_tokens=special) == reference.encode(
                    text, add_special_tokens=special
                ), (folder, text)
        vocab = len(reference)
        specials = list(reference.all_special_ids)
        for _ in range(20):
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))] + specials[:2]
            rng.shuffle(ids)
            for skip in (False, True):
                assert cached.decode(ids, skip_special_tokens=skip) == reference.decode(
                    ids, skip_special_tokens=skip
                ), (folder, ids)
        assert cached.decode(specials[0]) == reference.decode(specials[0])
        as_tensor = torch.tensor(ids)  # not plain ints: handed to transformers
        assert cached.decode(as_tensor) == reference.decode(as_tensor)
        # Everything else goes to the transformers tokenizer, loaded on first use.
        assert cached.get_vocab() == reference.get_vocab()
        assert len(cached) == vocab
        assert cached.eos_token_id == reference.eos_token_id
        assert cached("Hello")["input_ids"] == reference("Hello")["input_ids"]
        assert type(cached.transformers_tokenizer) is type(reference)
    assert "demo-model" in remembered and len(remembered) >= 2, remembered


def test_other_files_versions_or_cache_off_load_through_transformers(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tokenizer"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    load_tokenizer(folder)
    assert isinstance(load_tokenizer(folder), CachedFastTokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    assert not isinstance(load_tokenizer(folder), CachedFastTokenizer)  # another key
    assert isinstance(load_tokenizer(folder), CachedFastTokenizer)  # remembered anew
    monkeypatch.setattr(tokenizer_cache, "_version", lambda package: "0.0-other")
    assert not isinstance(load_tokenizer(folder), CachedFastTokenizer)
    monkeypatch.undo()
    monkeypatch.setenv("LANNER_CACHE_DIR", str(cache))
    monkeypatch.setenv("LANNER_TOKENIZER_CACHE", "0")
    assert not isinstance(load_tokenizer(folder), CachedFastTokenizer)


def test_unreadable_cache_file_or_folder_is_ignored(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = load_tokenizer(DEMO)
    (entry,) = (cache / "tokenizers").iterdir()
    entry.write_text("{not json")
    assert not isinstance(load_tokenizer(DEMO), CachedFastTokenizer)
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a file where the cache folder would be
    monkeypatch.setenv("LANNER_CACHE_DIR", str(blocked))
    assert not tokenizer_cache.remember(DEMO, reference)
    assert not isinstance(load_tokenizer(DEMO), CachedFastTokenizer)


LOAD_WITHOUT_TRANSFORMERS = """
import json, sys
from lanner.model.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1], remember_apart=sys.argv[2] == "apart")
found = {
    "class": type(tokenizer).__name__,
    "ids": tokenizer.encode("Hello <|user|> world"),
    "text": tokenizer.decode([45, 404, 307, 226, 3], skip_special_tokens=True),
    "transformers_imported": "transformers" in sys.modules,
}
tokenizer.chat_template  # only transformers has it: loaded now
found["transformers_after_chat_template"] = "transformers" in sys.modules
print(json.dumps(found))
"""


def _load_in_fresh_process(how: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_TRANSFORMERS, str(DEMO), how],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("how", ["remembered", "apart"])
def test_remembered_tokenizer_loads_without_importing_transformers(cache: Path, how: str) -> None:
    """Remembered by an earlier load here, or (remember_apart, an empty cache) built and
    remembered by a child process: either way this process never imports transformers
    until something only transformers has is used."""
    reference = load_tokenizer(DEMO)
    if how == "apart":
        shutil.rmtree(cache)
    found = _load_in_fresh_process(how)
    assert found["class"] == "CachedFastTokenizer"
    assert not found["transformers_imported"]
    assert found["ids"] == reference.encode("Hello <|user|> world")
    assert found["text"] == reference.decode([45, 404, 307, 226, 3], skip_special_tokens=True)
    assert found["transformers_after_chat_template"]
    assert len(list((cache / "tokenizers").iterdir())) == 1


def test_remember_apart_falls_back_to_loading_here(
    cache: Path, tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A child that fails (logged), a class that is never remembered, or the cache off: the
    tokenizer loads through transformers here, as without remember_apart."""
    reference = load_tokenizer(DEMO, remember_apart=False)
    shutil.rmtree(cache)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    assert type(load_tokenizer(DEMO, remember_apart=True)) is type(reference)
    assert "apart failed (exit 1)" in caplog.text
    monkeypatch.undo()
    monkeypatch.setenv("LANNER_CACHE_DIR", str(cache))
    monkeypatch.setenv("LANNER_TOKENIZER_CACHE", "0")
    assert not isinstance(load_tokenizer(DEMO, remember_apart=True), CachedFastTokenizer)
    references = {folder: load_tokenizer(folder) for folder in tiny_model_dirs.values()}
    monkeypatch.setenv("LANNER_TOKENIZER_CACHE", "1")
    for folder, reference in references.items():
        loaded = load_tokenizer(folder, remember_apart=True)
        assert isinstance(loaded, CachedFastTokenizer) or type(loaded) is type(reference)
        assert loaded.encode(TEXTS[4]) == reference.encode(TEXTS[4]), folder
