"""Route keys of OpenAI request bodies, for cache-aware routing: a completion's prompt
(text or token ids), or a chat's messages, roles and text in order.

Chat is keyed on the messages, not on the text the chat template renders: a template
renders the messages in order, so two chats that open with the same messages render
texts that open the same way, and the key's shared prefix grows with the rendered one.
The router then needs neither the model's tokenizer nor Jinja (whose rendering of
hostile input is slow), and works in front of any OpenAI-compatible worker.
"""

from __future__ import annotations

import json
from typing import Any

from lanner.engine.routing import MAX_KEY_CHARS, text_key, token_key

# Bodies above this are routed by load alone: parsing them whole on the event loop
# would stall every other request (json holds the GIL, so a thread would not help).
MAX_PARSED_BODY_BYTES = 512 << 10


def route_key(path: str, body: bytes) -> str | None:
    """The key of a /v1/completions or /v1/chat/completions body; None when the body
    is too big or not what the endpoint takes (the worker then says what is wrong)."""
    if len(body) > MAX_PARSED_BODY_BYTES:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    if path.endswith("/chat/completions"):
        return _chat_key(payload.get("messages"))
    return _prompt_key(payload.get("prompt"))


def _is_token_ids(items: list[Any]) -> bool:
    head = items[:MAX_KEY_CHARS]
    return bool(head) and all(isinstance(t, int) and not isinstance(t, bool) for t in head)


def _prompt_key(prompt: Any) -> str | None:
    """A batch of prompts goes to one worker, keyed by its first prompt."""
    if isinstance(prompt, str):
        return text_key(prompt) if prompt else None
    if not isinstance(prompt, list) or not prompt:
        return None
    first = prompt[0]
    if isinstance(first, str):
        return _prompt_key(first)
    if isinstance(first, list):
        return token_key(first) if _is_token_ids(first) else None
    return token_key(prompt) if _is_token_ids(prompt) else None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _chat_key(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return None
    pieces, size = [], 0
    for message in messages:
        if not isinstance(message, dict):
            return None
        # Unit and record separators keep "ab"+"c" apart from "a"+"bc".
        piece = f"{message.get('role')}\x1f{_content_text(message.get('content'))}\x1e"
        pieces.append(piece)
        size += len(piece)
        if size >= MAX_KEY_CHARS:
            break
    return text_key("".join(pieces))
