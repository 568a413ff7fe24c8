"""The `lanner` command: serve (the OpenAI-compatible server), router (a load-balancing
front over several servers), generate (one prompt, with a timing summary), chat and bench."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from lanner.engine.config import DEFAULT_MODEL_DIR

# Engine flags, spelled as vLLM spells them: (flag, type, help).
_ENGINE_FLAGS: list[tuple[str, type, str]] = [
    ("--tokenizer", str, "tokenizer folder or Hub id (default: the model's)"),
    ("--revision", str, "Hub revision of the model"),
    ("--dtype", str, "auto, float32, bfloat16 or float16"),
    ("--device", str, "cuda or cpu (default: cuda when available)"),
    ("--load-format", str, "auto, safetensors or dummy (random weights)"),
    ("--quantization", str, "fp8 or int8 (quantize while loading), or the checkpoint's method"),
    ("--seed", int, "seed for dummy weights"),
    ("--max-model-len", int, "context limit per request, prompt plus output"),
    ("--max-num-seqs", int, "most requests in one batch"),
    ("--max-num-batched-tokens", int, "most tokens in one step"),
    ("--block-size", int, "tokens per KV cache block"),
    ("--gpu-memory-utilization", float, "share of GPU memory the engine may use"),
    ("--kv-cache-memory-bytes", int, "KV cache size in bytes (the CPU default is 2 GiB)"),
    ("--num-gpu-blocks-override", int, "exact number of KV cache blocks"),
    ("--kv-cache-dtype", str, "auto (the model's dtype) or fp8 (e4m3: half the bytes)"),
    ("--scheduling-policy", str, "fcfs, priority or lpm (longest cached prefix first)"),
    ("--distributed-executor-backend", str, "how tensor-parallel workers run: mp or ray"),
    (
        "--distributed-timeout-s",
        float,
        "seconds a step may wait on a tensor-parallel worker before the engine fails",
    ),
]


# Engine options that are off unless the flag is given.
_ENGINE_SWITCHES: list[tuple[str, str]] = [
    ("--enforce-eager", "never capture CUDA graphs (every step runs eagerly)"),
    ("--trust-remote-code", "allow the checkpoint's own tokenizer code"),
]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL_DIR),
        help="model folder or Hub id (default: the embedded demo model)",
    )
    for flag, kind, text in _ENGINE_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="split the model over this many GPUs (or CPU processes) (default: 1)",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV cache of shared prompt prefixes (default: on)",
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap scheduling of step N+1 with step N on the device (default: on CUDA)",
    )
    for flag, text in _ENGINE_SWITCHES:
        parser.add_argument(flag, action="store_true", default=None, help=text)
    parser.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 3}\' or \'{"method": "draft_model", "model": PATH, '
        '"num_speculative_tokens": 3}\' (default: off)',
    )


def _speculative_config(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--speculative-config is not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--speculative-config must be a JSON object, got {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the user set, as LLM(...) keyword arguments."""
    options: dict[str, Any] = {"model": args.model}
    for flag, _, _ in _ENGINE_FLAGS:
        name = flag.removeprefix("--").replace("-", "_")
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    for name in ("tensor_parallel_size", "enable_prefix_caching", "async_scheduling"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    for flag, _ in _ENGINE_SWITCHES:
        name = flag.removeprefix("--").replace("-", "_")
        if getattr(args, name):
            options[name] = True
    if getattr(args, "speculative_config", None) is not None:
        options["speculative_config"] = _speculative_config(args.speculative_config)
    return options


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--sample-seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):  # noqa: ANN201
    from lanner.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed,
        stop=args.stop,
    )


def run_generate(args: argparse.Namespace) -> int:
    from lanner.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    started = time.perf_counter()
    [output] = llm.generate(args.prompt, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    completion = output.outputs[0]
    print(args.prompt + completion.text)
    metrics = output.metrics
    ttft = metrics.time_to_first_token
    tpot = metrics.time_per_output_token
    count = len(completion.token_ids)
    print(
        f"--- {len(output.prompt_token_ids)} prompt + {count} output tokens "
        f"({completion.finish_reason}) | TTFT {ttft * 1e3:.1f} ms | "
        f"TPOT {tpot * 1e3 if tpot else float('nan'):.2f} ms | "
        f"{count / elapsed:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from lanner.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("lanner chat: type a message, an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        [output] = llm.chat(messages, params, use_tqdm=False)
        reply = output.outputs[0].text
        print(f"assistant> {reply}", flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        from lanner.entrypoints.openai.api_server import run_server
    except ImportError as err:
        raise ValueError(
            f"`lanner serve` needs the server's packages ({err.name} is missing); "
            f"install them with: pip install 'lanner[serve]'"
        ) from err
    from lanner.entrypoints.openai.limits import limits_from_args

    if args.model_tag is not None:
        args.model = args.model_tag
    return run_server(args, engine_kwargs(args), limits_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lanner", description="lanner LLM inference engine")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI API over HTTP")
    serve.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        help="model folder or Hub id (default: the embedded demo model)",
    )
    add_engine_args(serve)
    _add_server_args(serve)
    _add_data_parallel_args(serve)
    serve.set_defaults(handler=run_serve)

    from lanner.entrypoints.router import args as router_args

    router = commands.add_parser("router", help="balance requests over several servers")
    router_args.add_router_args(router)
    router.set_defaults(handler=router_args.run_router_command)

    generate = commands.add_parser("generate", help="complete one prompt and report timings")
    generate.add_argument("prompt", help="the text to complete")
    add_engine_args(generate)
    add_sampling_args(generate)
    generate.set_defaults(handler=run_generate)

    chat = commands.add_parser("chat", help="chat interactively through the chat template")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(handler=run_chat)

    _add_bench_parser(commands)
    return parser


def _add_bench_parser(commands: Any) -> None:
    # The bench modules import only the standard library at the top, so `lanner --help`
    # stays fast; each handler imports what it runs.
    from lanner.bench import datasets, serve_client, throughput

    bench = commands.add_parser("bench", help="benchmark throughput, latency or a server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    offline = kinds.add_parser("throughput", help="offline: all requests at once through LLM")
    add_engine_args(offline)
    datasets.add_dataset_args(offline)
    throughput.add_sampling_args(offline)
    throughput.add_warmup_arg(offline, default=0)
    throughput.add_common_args(offline)
    offline.set_defaults(handler=_bench_handler("throughput", "run_throughput"))

    latency = kinds.add_parser("latency", help="one batch, repeated: TTFT and TPOT percentiles")
    add_engine_args(latency)
    latency.add_argument("--batch-size", type=int, default=8)
    latency.add_argument("--input-len", type=int, default=32)
    latency.add_argument("--output-len", type=int, default=128)
    latency.add_argument("--num-iters", type=int, default=30)
    latency.add_argument("--num-iters-warmup", type=int, default=3)
    throughput.add_sampling_args(latency)
    throughput.add_common_args(latency)
    latency.set_defaults(handler=_bench_handler("latency", "run_latency"))

    serve = kinds.add_parser("serve", help="stream requests to an OpenAI-compatible server")
    serve_client.add_serve_args(serve)
    datasets.add_dataset_args(serve)
    throughput.add_sampling_args(serve)
    throughput.add_common_args(serve)
    serve.set_defaults(handler=_bench_handler("serve_client", "run_serve_bench"))

    ceilings = kinds.add_parser("ceilings", help="measure this card's copy and matmul ceilings")
    ceilings.set_defaults(handler=_bench_handler("roofline", "run_ceilings"))


def _bench_handler(module: str, function: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"lanner.bench.{module}"), function)(args)

    return handler


def _add_data_parallel_args(parser: argparse.ArgumentParser) -> None:
    from lanner.entrypoints.router.args import POLICY_NAMES

    parser.add_argument(
        "--data-parallel-size", type=int, default=1,
        help="engine cores behind this server, each with its own copy of the model: one "
        "per GPU on CUDA, processes on the CPU (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--data-parallel-policy", choices=POLICY_NAMES, default="cache_aware",
        help="how a request's engine core is picked (lanner router's policies)",
    )  # fmt: skip


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    # Spelled here rather than imported, so `lanner --help` works without the server's
    # packages installed (limits.py imports only the standard library and SamplingParams).
    from lanner.entrypoints.openai.limits import add_limit_args

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on all but /health (default: the "
        "LANNER_API_KEY environment variable, which other users cannot read)",
    )
    parser.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        help="Host header names the server answers ('*': any; default: the loopback names "
        "when --host is a loopback address, any otherwise)",
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) the API accepts (default: the model argument; lanner-demo for "
        "the embedded demo model)",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="at most this many requests may wait beyond a full batch (--max-num-seqs); "
        "more get HTTP 429 (default: no limit)",
    )
    parser.add_argument(
        "--timeout-graceful-shutdown",
        type=float,
        default=None,
        help="on SIGTERM, seconds in-flight requests get to finish (default: unlimited)",
    )
    parser.add_argument("--uvicorn-log-level", default="info", help="uvicorn's log level")
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let chat requests with tools use tool_choice 'auto' (needs --tool-call-parser)",
    )
    parser.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["hermes", "llama3_json"],
        help="the model's tool-call format, for tool_choice 'auto'",
    )
    add_limit_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"lanner: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
