"""Speculation where users meet it: the CLI flag, `lanner bench` summaries and the
server's Prometheus counters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lanner.engine.core import EngineCoreStats
from lanner.entrypoints.cli import main
from tests.bench.test_bench import ENGINE, run_bench

NGRAM = json.dumps(
    {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 1,
        "adaptive_draft_length": False,
    }
)


def test_bench_latency_reports_the_acceptance_length(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_bench(
        tmp_path,
        "latency",
        ["latency", "--model", str(tiny_model_dirs["llama"]), *ENGINE, "--batch-size", "2",
         "--input-len", "8", "--output-len", "24", "--num-iters", "2", "--num-iters-warmup", "1",
         "--temperature", "0", "--speculative-config", NGRAM],
    )  # fmt: skip
    spec = result["results"]["spec_decode"]
    assert spec["num_drafts"] > 0
    assert spec["mean_acceptance_length"] == 1 + spec["num_accepted_tokens"] / spec["num_drafts"]
    assert result["results"]["output_tokens_per_iter"] == [48, 48]
    assert "mean acceptance length" in capsys.readouterr().out


def test_bad_speculative_config_flag_is_a_usage_error(
    tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_model_dirs["llama"])
    assert main(["generate", "x", "--model", model, "--speculative-config", "{method: ngram"]) == 2
    assert "--speculative-config is not valid JSON" in capsys.readouterr().err
    bad = json.dumps({"method": "ngram", "num_speculative_tokens": 0})
    assert main(["generate", "x", "--model", model, "--speculative-config", bad]) == 2
    assert "speculative_config.num_speculative_tokens" in capsys.readouterr().err


def test_prometheus_counters_follow_the_core_counts() -> None:
    pytest.importorskip("prometheus_client")
    from lanner.metrics.prometheus import ServerMetrics

    metrics = ServerMetrics("m")
    first = EngineCoreStats(
        spec_num_drafts=4,
        spec_num_draft_tokens=12,
        spec_num_accepted_tokens=7,
        spec_num_accepted_tokens_per_pos=[4, 2, 1],
    )
    metrics.on_core_stats(first)
    metrics.on_core_stats(first)  # the same snapshot again adds nothing
    metrics.on_core_stats(
        EngineCoreStats(
            spec_num_drafts=5,
            spec_num_draft_tokens=15,
            spec_num_accepted_tokens=10,
            spec_num_accepted_tokens_per_pos=[5, 3, 2],
        )
    )
    text = metrics.render().decode()
    assert 'lanner:spec_decode_num_drafts_total{model_name="m"} 5.0' in text
    assert 'lanner:spec_decode_num_draft_tokens_total{model_name="m"} 15.0' in text
    assert 'lanner:spec_decode_num_accepted_tokens_total{model_name="m"} 10.0' in text
    per_pos = "lanner:spec_decode_num_accepted_tokens_per_pos_total"
    assert f'{per_pos}{{model_name="m",position="0"}} 5.0' in text
    assert f'{per_pos}{{model_name="m",position="2"}} 2.0' in text
