"""Loads a checkpoint's tokenizer through transformers' AutoTokenizer (or, once remembered,
model/tokenizer_cache.py's stand-in for it), and applies its chat template to a
conversation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanner.model import tokenizer_cache

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The chat template itself failed (syntax, an error it raised, runaway output)."""


def load_tokenizer(
    model_dir: str | Path, trust_remote_code: bool = False, remember_apart: bool = False
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer: for a local folder whose fast tokenizer an earlier load
    remembered (model/tokenizer_cache.py), its backend alone, without importing
    transformers (which then loads on first use of anything else); otherwise transformers'
    (remembered for the next time). With ``remember_apart``, a generic fast tokenizer not
    yet remembered is built and remembered by a child process and loaded back from the
    cache: importing transformers and building the tokenizer then hold that process's GIL,
    not this one's, where the engine builds beside it (5.6 s of Python for the demo
    tokenizer on the H200's host, 2026-12-02)."""
    local = not trust_remote_code and Path(model_dir).is_dir()
    if local and (Path(model_dir) / "tokenizer.json").is_file():

        def load_transformers() -> PreTrainedTokenizerBase:
            return _load_transformers_tokenizer(model_dir, trust_remote_code)

        cached = tokenizer_cache.load(model_dir, load_transformers)
        if (
            cached is None
            and remember_apart
            and tokenizer_cache.enabled()
            and _named_tokenizer_name(model_dir) in tokenizer_cache.REMEMBERED_CLASSES
            and _remember_in_child(model_dir)
        ):
            cached = tokenizer_cache.load(model_dir, load_transformers)
        if cached is not None:
            return cached  # type: ignore[return-value]
    tokenizer = _load_transformers_tokenizer(model_dir, trust_remote_code)
    if local:
        tokenizer_cache.remember(model_dir, tokenizer)
    return tokenizer


# Run by _remember_in_child: load through transformers and remember; exit 0 when remembered.
# Without torch: transformers' tokenizer module imports it where found, and a generic fast
# tokenizer needs none of it (the same backend, byte for byte; 1.8 s against 3.6 s for the
# demo tokenizer on a 2-core Xeon).
_REMEMBER_SCRIPT = """
import sys
sys.modules["torch"] = None
from lanner.model import tokenizer, tokenizer_cache
loaded = tokenizer._load_transformers_tokenizer(sys.argv[1], False)
sys.exit(0 if tokenizer_cache.remember(sys.argv[1], loaded) else 3)
"""


def _remember_in_child(model_dir: str | Path, timeout: float = 300.0) -> bool:
    """Remember ``model_dir``'s tokenizer from a child Python process; False (logged when
    it failed) when it did not, and the caller loads it here."""
    root = str(Path(__file__).resolve().parents[2])  # lanner's parent: importable there too
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    try:
        done = subprocess.run(
            [sys.executable, "-c", _REMEMBER_SCRIPT, str(model_dir)],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("remembering the tokenizer of %s apart failed (%r)", model_dir, err)
        return False
    if done.returncode not in (0, 3):
        logger.warning(
            "remembering the tokenizer of %s apart failed (exit %s): %s",
            model_dir,
            done.returncode,
            done.stderr[-1000:],
        )
    return done.returncode == 0


def _load_transformers_tokenizer(
    model_dir: str | Path, trust_remote_code: bool
) -> PreTrainedTokenizerBase:
    try:
        direct = None if trust_remote_code else _named_tokenizer_class(model_dir)
        if direct is not None:
            return direct.from_pretrained(str(model_dir))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load a tokenizer from {model_dir}: {err}. The checkpoint folder needs "
            f"tokenizer.json (or the files its tokenizer_config.json names)"
        ) from err


# Where AutoTokenizer's choice is the class tokenizer_config.json names, known without
# importing it: model types (config.json) -> the classes it then takes as named. Others
# (qwen2's hub class is overridden, Mistral may get its own backend, ...) go through
# AutoTokenizer itself.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_NAMED_TOKENIZERS = {"llama": ("LlamaTokenizer", "LlamaTokenizerFast"), "qwen3": ("Qwen2Tokenizer",
                     "Qwen2TokenizerFast")}  # fmt: skip


def _named_tokenizer_name(model_dir: str | Path) -> str | None:
    """The name of the tokenizer class AutoTokenizer would load for a local checkpoint, when
    that is plain to see (see _NAMED_TOKENIZERS), read from its files alone. None: ask
    AutoTokenizer."""
    folder = Path(model_dir)
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "auto_map" in config:
        return None
    name = config.get("tokenizer_class")
    if (
        model_type not in _NAMED_TOKENIZERS
        or name not in _GENERIC_TOKENIZERS + _NAMED_TOKENIZERS[model_type]
    ):
        return None
    return "TokenizersBackend" if name in _GENERIC_TOKENIZERS else name


def _named_tokenizer_class(model_dir: str | Path) -> type | None:
    """The tokenizer class AutoTokenizer would load for a local checkpoint, when that is
    plain to see (_named_tokenizer_name), without importing AutoTokenizer: it imports
    transformers' generation code (and scikit-learn where installed), most of the offline
    engine's import time. None: ask AutoTokenizer."""
    name = _named_tokenizer_name(model_dir)
    if name is None:
        return None
    import transformers

    if name == "TokenizersBackend":
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend
    return getattr(transformers, name)


def tokenizer_modules(model_dir: str | Path) -> list[str]:
    """The modules load_tokenizer will import for this checkpoint: what a process that
    forks tokenizer workers should import once, before forking."""
    if _named_tokenizer_class(model_dir) is not None:
        return ["transformers", "transformers.tokenization_utils_tokenizers"]
    return ["transformers", "transformers.models.auto.tokenization_auto"]


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters one token stands for: its vocabulary string's length
    (byte-level BPE spells each byte as one character, and a byte is at most a character)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def bad_words_token_ids(tokenizer: PreTrainedTokenizerBase, words: list[str]) -> list[list[int]]:
    """Each bad word as the token sequences it may appear as: alone, and after a space
    (BPE tokenizers spell " word" with other tokens than "word")."""
    sequences: list[list[int]] = []
    for word in words:
        for spelling in (word, " " + word) if not word.startswith(" ") else (word,):
            ids = tokenizer.encode(spelling, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def conversation_from_messages(messages: Any) -> list[dict[str, str]]:
    """Check a list of chat messages ({"role": str, "content": str | None | text parts})
    and return it as role/content strings; ValueError saying what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}"
        )
    conversation = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}] needs a 'role' string, got {role!r}")
        conversation.append({"role": role, "content": message_text(message.get("content"))})
    return conversation


def message_text(content: Any) -> str:
    """A message's content as one string: a string, None, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise ValueError(
            f"message content must be a string or a list of text parts, got "
            f"{type(content).__name__}"
        )
    parts = []
    for part in content:
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(
                f"message content parts must be of type 'text' with a 'text' string (this "
                f"server has no multimodal models), got {kind!r}"
            )
        parts.append(part["text"])
    return "".join(parts)


def render_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, str]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The conversation as prompt text, through ``chat_template`` or the tokenizer's own.
    Raises ChatTemplateError when the template fails (transformers renders it in Jinja's
    sandbox, so it reaches nothing outside)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template; pass chat_template or use plain "
            "completions"
        )
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tools=tools,
        )
    except Exception as err:  # noqa: BLE001 - whatever the template does is its own error
        detail = str(err)
        detail = detail if len(detail) <= 500 else detail[:500] + "..."
        raise ChatTemplateError(
            f"the chat template failed: {type(err).__name__}: {detail}"
        ) from None
    if not isinstance(text, str):
        raise ChatTemplateError(f"the chat template gave {type(text).__name__}, not text")
    return text
