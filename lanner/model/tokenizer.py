"""Loads a checkpoint's tokenizer through transformers' AutoTokenizer, and applies its chat
template to a conversation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class ChatTemplateError(ValueError):
    """The chat template itself failed (syntax, an error it raised, runaway output)."""


def load_tokenizer(
    model_dir: str | Path, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load a tokenizer from {model_dir}: {err}. The checkpoint folder needs "
            f"tokenizer.json (or the files its tokenizer_config.json names)"
        ) from err


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters one token stands for: its vocabulary string's length
    (byte-level BPE spells each byte as one character, and a byte is at most a character)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


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
