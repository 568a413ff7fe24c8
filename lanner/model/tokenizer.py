"""Loads a checkpoint's tokenizer (and chat template) through transformers' AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


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
