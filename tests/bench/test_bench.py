"""`lanner bench` on the CPU with a tiny model: throughput over every dataset, latency,
and the serving client against a real `lanner serve`; the JSON figures must agree with
what was asked, and --plot must write PNGs matplotlib reads back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lanner.bench import datasets, roofline, serve_client
from lanner.entrypoints.cli import main
from tests.entrypoints.server_utils import ServerProcess

ENGINE = ["--dtype", "float32", "--device", "cpu", "--block-size", "4",
          "--num-gpu-blocks-override", "96", "--max-model-len", "64"]  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV_KEYS = ("workload", "model", "card", "commit", "command", "results")


def check_png(path: str | Path) -> None:
    import matplotlib.image

    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def check_ordered(stats: dict[str, float]) -> None:
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    assert stats["p50"] >= 0


def run_bench(tmp_path: Path, name: str, argv: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["--log-level", "WARNING", "bench", *argv, "--disable-tqdm",
                 "--output-json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    for key in ENV_KEYS:
        assert key in result
    assert result["card"] == "cpu" and result["commit"]
    return result


def test_datasets_are_seeded_and_shaped() -> None:
    a = datasets.random_requests(50, 0, 0, 100, seed=3, input_range=(5, 9), output_range=(2, 4))
    b = datasets.random_requests(50, 0, 0, 100, seed=3, input_range=(5, 9), output_range=(2, 4))
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert {r.input_len for r in a} == set(range(5, 10))
    assert {r.output_len for r in a} == {2, 3, 4}
    assert all(0 <= t < 100 for r in a for t in r.prompt_token_ids)
    prefixed = datasets.prefix_requests(4, 20, 3, 1000, prefix_share=0.75, seed=1)
    assert all(r.prompt_token_ids[:15] == prefixed[0].prompt_token_ids[:15] for r in prefixed)
    assert len({tuple(r.prompt_token_ids[15:]) for r in prefixed}) == 4
    fixed = datasets.fixed_requests(3, 7, 2, 50)
    assert all(r.prompt_token_ids == fixed[0].prompt_token_ids for r in fixed)
    with pytest.raises(ValueError):
        datasets.parse_range("9:5")


def test_tenants_dataset_is_workload_w9() -> None:
    requests = datasets.tenant_requests(200, 4, 40, 8, 5, 1000, seed=2)
    assert requests == datasets.tenant_requests(200, 4, 40, 8, 5, 1000, seed=2)
    prefixes = {tuple(r.prompt_token_ids[:40]) for r in requests}
    assert len(prefixes) == 4  # each tenant's system prompt, shared by its requests
    assert {r.input_len for r in requests} == {48} and {r.output_len for r in requests} == {5}
    assert len({tuple(r.prompt_token_ids[40:]) for r in requests}) == 200  # own user turns
    shares = [sum(tuple(r.prompt_token_ids[:40]) == p for r in requests) for p in prefixes]
    assert min(shares) > 25  # tenants drawn uniformly: about 50 each
    with pytest.raises(ValueError, match="--num-tenants"):
        datasets.tenant_requests(1, 0, 4, 4, 1, 10)


def test_goodput_and_summary_figures() -> None:
    results = []
    for i in range(1, 11):
        r = serve_client.RequestResult(10, 5, success=True, output_tokens=5)
        r.ttft, r.latency, r.itl = 0.01 * i, 0.01 * i + 0.04, [0.01] * 4
        results.append(r)
    results.append(serve_client.RequestResult(10, 5, error="HTTP 500"))
    slos = serve_client.parse_goodput(["ttft:50", "tpot:20"])
    summary = serve_client.summarize_run(results, 2.0, 4.0, slos)
    assert (summary["completed"], summary["failed"]) == (10, 1)
    assert summary["goodput_requests"] == 5 and summary["goodput_share"] == pytest.approx(5 / 11)
    assert summary["request_goodput"] == pytest.approx(2.5)
    assert summary["median_tpot_ms"] == pytest.approx(10.0)
    assert summary["median_ttft_ms"] <= summary["p90_ttft_ms"] <= summary["p99_ttft_ms"]
    with pytest.raises(ValueError):
        serve_client.parse_goodput(["latency:5"])


def test_roofline_floor_of_a_known_shape() -> None:
    shape = roofline.ModelShape.from_model_dir(
        Path(__file__).resolve().parents[2] / "benchmarks" / "shapes" / "llama3-8b", "bfloat16"
    )
    # Llama-3-8B less its input embedding: ~7.5e9 weights every decode step multiplies.
    assert 7.4e9 < shape.matmul_params < 7.6e9
    assert shape.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    floor = roofline.workload_floor(shape, [(128, 256)], batch_size=1)
    assert floor["decode_steps"] == 256
    ceilings = {"card": "test", "copy_bytes_per_s": 3.0e12, "bf16_matmul_flops_per_s": 7.9e14}
    section = roofline.utilization(floor, 2.0, ceilings)
    assert section["bound"] == "bandwidth"
    assert 0 < section["gpu_utilization"] == section["bandwidth_share"] < 1
    assert "GPU utilization" in roofline.format_roofline(section)


@pytest.mark.parametrize(
    ("dataset", "extra"),
    [
        ("random", ["--input-len-range", "4:12", "--output-len-range", "2:6"]),
        ("fixed", ["--input-len", "9", "--output-len", "4"]),
        ("prefix", ["--input-len", "16", "--output-len", "3", "--prefix-share", "0.5"]),
        ("sharegpt", []),
    ],
)
def test_throughput_bench(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], dataset: str, extra: list[str]
) -> None:
    model = tiny_model_dirs["llama"]
    if dataset == "sharegpt":
        conversations = [
            {"conversations": [{"from": "human", "value": f"hello world {i} " * (i + 1)},
                               {"from": "gpt", "value": "the quick brown fox" * (i % 3 + 1)}]}
            for i in range(8)
        ]  # fmt: skip
        path = tmp_path / "sharegpt.json"
        path.write_text(json.dumps(conversations))
        extra = ["--dataset-path", str(path)]
    result = run_bench(
        tmp_path,
        dataset,
        ["throughput", "--model", str(model), *ENGINE, "--dataset-name", dataset,
         "--num-prompts", "6", *extra, *(["--plot"] if dataset == "random" else [])],
    )  # fmt: skip
    figures = result["results"]
    assert figures["num_requests"] == 6
    assert figures["total_output_tokens"] == figures["requested_output_tokens"]
    if dataset == "fixed":
        assert figures["total_input_tokens"] == 6 * 9 and figures["total_output_tokens"] == 24
    if dataset == "prefix":
        assert figures["total_input_tokens"] == 6 * 16
    assert figures["elapsed_s"] > 0
    tokens = figures["total_input_tokens"] + figures["total_output_tokens"]
    assert figures["total_tok_per_s"] == pytest.approx(tokens / figures["elapsed_s"])
    assert figures["requests_per_s"] == pytest.approx(6 / figures["elapsed_s"])
    assert "note" in result["roofline"]
    if dataset == "random":
        [png] = result["plots"]
        check_png(png)


def test_latency_bench(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    result = run_bench(
        tmp_path,
        "latency",
        ["latency", "--model", str(tiny_model_dirs["llama"]), *ENGINE, "--batch-size", "3",
         "--input-len", "8", "--output-len", "5", "--num-iters", "3", "--num-iters-warmup", "1",
         "--plot"],
    )  # fmt: skip
    figures = result["results"]
    assert figures["output_tokens_per_iter"] == [15, 15, 15]
    for key in ("ttft_ms", "tpot_ms", "batch_latency_ms", "e2e_request_ms"):
        check_ordered(figures[key])
    assert figures["batch_latency_ms"]["median"] > 0
    assert len(figures["batch_latencies_ms"]) == 3
    assert "note" in result["roofline"]
    [png] = result["plots"]
    check_png(png)


def test_serve_bench_against_a_real_server(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    server = ServerProcess(
        tiny_model_dirs["llama"],
        ["--num-gpu-blocks-override", "96", "--max-model-len", "64"],
        tmp_path / "server.log",
    )
    try:
        server.wait_ready()
        result = run_bench(
            tmp_path,
            "serve",
            ["serve", "--base-url", server.url, "--num-prompts", "8",
             "--input-len-range", "4:10", "--output-len-range", "2:6", "--request-rates",
             "50,inf", "--max-concurrency", "4", "--goodput", "ttft:60000", "tpot:60000",
             "--tokenizer", str(tiny_model_dirs["llama"]), "--num-warmups", "2", "--plot"],
        )  # fmt: skip
        # The chat endpoint takes the same prompts as text, each one user turn.
        chat = run_bench(
            tmp_path,
            "serve",
            ["serve", "--base-url", server.url, "--endpoint", "/v1/chat/completions",
             "--num-prompts", "4", "--input-len-range", "4:10", "--output-len-range", "2:6",
             "--tokenizer", str(tiny_model_dirs["llama"])],
        )["results"]["runs"][0]  # fmt: skip
    finally:
        server.stop()
    wanted = datasets.random_requests(4, 0, 0, 384, 0, (4, 10), (2, 6))
    assert (chat["completed"], chat["failed"]) == (4, 0)
    assert chat["total_output_tokens"] == sum(r.output_len for r in wanted)
    assert [run["request_rate"] for run in result["results"]["runs"]] == [50.0, "inf"]
    for seed, run in enumerate(result["results"]["runs"]):
        # Each rate draws its own prompts (seed + its index), so no run hits the prefix
        # cache an earlier one filled.
        wanted = datasets.random_requests(8, 0, 0, 384, seed, (4, 10), (2, 6))
        assert (run["completed"], run["failed"]) == (8, 0)
        assert run["total_input_tokens"] == sum(r.input_len for r in wanted)
        outputs = sum(r.output_len for r in wanted)
        assert run["total_output_tokens"] == run["requested_output_tokens"] == outputs
        assert run["duration_s"] > 0 and run["request_throughput"] > 0
        assert run["output_throughput"] == pytest.approx(outputs / run["duration_s"])
        assert 0.0 <= run["goodput_share"] <= 1.0 and run["goodput_share"] == 1.0
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert run[f"p50_{name}_ms"] <= run[f"p90_{name}_ms"] <= run[f"p99_{name}_ms"]
            assert math.isfinite(run[f"mean_{name}_ms"]) and run[f"mean_{name}_ms"] > 0
        assert run["median_ttft_ms"] <= run["median_e2el_ms"]
        assert "note" in run["roofline"]
    assert len(result["plots"]) == 3  # a CDF per rate and the sweep
    for png in result["plots"]:
        check_png(png)


def test_ceilings_and_roofline_say_why_they_are_omitted_on_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "ceilings"]) == 0
    assert roofline.CPU_NOTE in capsys.readouterr().out
    section = roofline.roofline_section(None, lambda s: {}, 1.0, device="cpu")
    assert section == {"note": roofline.CPU_NOTE}
