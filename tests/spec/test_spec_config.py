"""SpeculativeConfig and a draft's fit to the target fail at start, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lanner import LLM
from lanner.engine.config import EngineConfig
from lanner.spec.config import SpeculativeConfig

DEMO_DRAFT = Path(__file__).resolve().parents[2] / "lanner/assets/demo-draft"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"method": "ngram", "num_speculative_tokens": 2, "k": 3}, "unknown speculative_config"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 4,
                "prompt_lookup_max": 2,
            },
            "prompt_lookup_min (4) must be <= prompt_lookup_max (2)",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
            "prompt_lookup_min",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "model": "x"},
            "speculative_config.model",
        ),
        (
            {"method": "draft_model", "num_speculative_tokens": 2},
            "speculative_config.model is required",
        ),
        (
            {
                "method": "draft_model",
                "model": "x",
                "num_speculative_tokens": 2,
                "prompt_lookup_max": 3,
            },
            "prompt_lookup_max is only for method 'ngram'",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
            "disable_by_batch_size",
        ),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "adaptive_draft_length": 1},
            "adaptive_draft_length",
        ),
        ("ngram", "must be a dict"),
    ],
)
def test_bad_configs_name_the_field(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig.from_kwargs(speculative_config=value)


def test_ngram_lookup_bounds_default_as_vllm() -> None:
    config = SpeculativeConfig.from_value({"method": "ngram", "num_speculative_tokens": 3})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (2, 5)
    one = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=4)
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (4, 4)
    # A config passed through EngineConfig (frozen) stays the same object type.
    engine = EngineConfig.from_kwargs(speculative_config=config)
    assert engine.speculative_config == config
    assert EngineConfig.from_kwargs().speculative_config is None  # off by default
    assert json.loads(json.dumps({"method": "ngram", "num_speculative_tokens": 3}))


def test_draft_must_share_the_vocabulary(tiny_model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"speculative_config.model .* vocabulary of 8192"):
        LLM(
            str(tiny_model_dirs["llama"]),
            dtype="float32",
            device="cpu",
            speculative_config={
                "method": "draft_model",
                "model": str(DEMO_DRAFT),
                "num_speculative_tokens": 2,
            },
        )


def test_draft_context_must_cover_max_model_len(tmp_path: Path) -> None:
    # The demo draft with its context cut to 512 positions, under the demo model (2048).
    for source in DEMO_DRAFT.iterdir():
        (tmp_path / source.name).symlink_to(source)
    config = json.loads((DEMO_DRAFT / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    with pytest.raises(ValueError, match="handles 512 positions, fewer than max_model_len 1024"):
        LLM(
            dtype="float32",
            device="cpu",
            max_model_len=1024,
            speculative_config={
                "method": "draft_model",
                "model": str(tmp_path),
                "num_speculative_tokens": 2,
            },
        )
