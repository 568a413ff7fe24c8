"""The `lanner` command as a vLLM user types it: --log-level anywhere, every flag with help
and its default, the model positional everywhere, --seed seeding sampling, and mistakes
caught before any model loads, each as one line that says what to change."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

import pytest

from lanner import LLM, SamplingParams
from lanner.bench import report
from lanner.engine.config import DEFAULT_MODEL_DIR
from lanner.engine.core import validate_prompt
from lanner.entrypoints import cli
from lanner.entrypoints import llm as llm_module
from lanner.model.loader import resolve_device, resolve_model_path
from tests.entrypoints.server_utils import free_port


def all_actions(parser: argparse.ArgumentParser, path: str = "lanner"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, parser, action


def test_every_flag_has_help_that_shows_its_default() -> None:
    missing = []
    for path, parser, action in all_actions(cli.build_parser()):
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        takes_value = action.option_strings and action.nargs != 0
        if not text or (takes_value and "default" not in text):
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: {text!r}")
    assert not missing


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--log-level", "DEBUG"],
        ["generate", "hello", "--log-level", "DEBUG"],
        ["chat", "--log-level", "DEBUG"],
        ["bench", "latency", "--log-level", "DEBUG"],
        ["bench", "serve", "--log-level", "DEBUG"],
        ["--log-level", "DEBUG", "serve"],
    ],
)
def test_log_level_anywhere(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).log_level == "DEBUG"


def test_model_is_positional_for_every_command_that_loads_one() -> None:
    parse = cli.build_parser().parse_args
    for argv in (["serve", "m"], ["chat", "m"], ["bench", "throughput", "m"],
                 ["bench", "latency", "m"], ["generate", "m", "hello"],
                 ["generate", "--model", "m", "hello"], ["serve", "--model", "m"]):  # fmt: skip
        assert cli.engine_kwargs(parse(argv))["model"] == "m", argv
    args = parse(["generate", "hello"])
    assert args.prompt == "hello" and cli.resolve_model(args) == str(DEFAULT_MODEL_DIR)
    with pytest.raises(ValueError, match="given twice"):
        cli.engine_kwargs(parse(["serve", "a", "--model", "b"]))


def test_seed_seeds_sampling(tiny_model_dirs: dict[str, Path]) -> None:
    """vLLM's --seed: requests without their own seed sample the same under the same
    engine seed (and differently under another)."""
    prompt = {"prompt_token_ids": [5, 9, 2, 7]}
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)

    def sample(seed: int) -> list[int]:
        llm = LLM(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu", seed=seed,
                  max_model_len=64, num_gpu_blocks_override=32)  # fmt: skip
        return llm.generate(prompt, params)[0].outputs[0].token_ids

    assert sample(1) == sample(1) != sample(2)
    assert (
        cli.engine_kwargs(cli.build_parser().parse_args(["generate", "x", "--seed", "7"]))["seed"]
        == 7
    )


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building an engine fails the test: the command must stop before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the engine was built")

    monkeypatch.setattr(llm_module.LLM, "__init__", refuse)
    from lanner.entrypoints.openai import api_server

    monkeypatch.setattr(api_server, "run_server", refuse)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.usefixtures("no_engine")
def test_bad_sampling_flags_fail_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    for flags, field in ((["--max-tokens", "0"], "max_tokens"), (["--top-p", "2"], "top_p")):
        code, err = run_main(["generate", "hello", *flags], capsys)
        assert code == 2 and field in err and err.count("\n") == 1


@pytest.mark.usefixtures("no_engine")
def test_serve_on_a_busy_port_fails_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, err = run_main(["serve", "--port", str(port)], capsys)
    assert code == 2 and f"127.0.0.1:{port}" in err and "--port" in err


def test_bad_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--log-level", "LOUD", "bench", "ceilings"]) == 2


def test_device_errors_are_value_errors() -> None:
    import torch

    with pytest.raises(ValueError, match="device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            LLM(device="cuda")


def test_offline_hub_error_says_what_to_do() -> None:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set")
    with pytest.raises(FileNotFoundError) as caught:
        resolve_model_path("nobody-here/no-such-model")
    message = str(caught.value)
    assert "local_files_only" not in message and "HF_HUB_OFFLINE" in message


def test_raise_max_model_len_only_when_it_can_be_raised() -> None:
    with pytest.raises(ValueError) as below:
        validate_prompt([1] * 8, 8, 100, model_max_len=32)
    assert "raise max_model_len (the model allows 32)" in str(below.value)
    with pytest.raises(ValueError) as at_max:
        validate_prompt([1] * 8, 8, 100, model_max_len=8)
    assert "raise" not in str(at_max.value) and "already the model's maximum" in str(at_max.value)


def test_bench_serve_without_a_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, err = run_main(["bench", "serve", "--base-url", dead, "--num-prompts", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and dead in err and "Traceback" not in err


def test_http_client_logs_no_line_per_request() -> None:
    cli.main(["--log-level", "INFO", "bench", "ceilings"])
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING


def test_results_land_in_the_current_directory_outside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert report.default_json_path("latency").parent == Path(".")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert report.default_json_path("latency").parent == report.RESULTS_DIR
    assert report.default_json_path("latency", tmp_path / "elsewhere").parent.name == "elsewhere"


def test_each_result_file_is_announced_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "result.json"
    report.write_json({"workload": "x"}, path)
    report.write_json({"workload": "x", "plots": []}, path)  # rewritten with its figures
    assert capsys.readouterr().out.count("wrote ") == 1
