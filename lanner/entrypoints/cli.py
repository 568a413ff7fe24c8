"""The `lanner` command: serve (the OpenAI-compatible server), router (a load-balancing
front over several servers), generate (one prompt, with a timing summary), chat and bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from lanner.engine.config import DEFAULT_MODEL_DIR

# Engine flags, spelled as vLLM spells them: (flag, type, help). Each help says the
# default, which the engine applies when the flag is left out.
_ENGINE_FLAGS: list[tuple[str, type, str]] = [
    ("--tokenizer", str, "tokenizer folder or Hub id (default: the model's)"),
    ("--revision", str, "Hub revision of the model (default: the latest)"),
    (
        "--dtype",
        str,
        "auto, float32, bfloat16 or float16 (default: auto: the checkpoint's dtype; "
        "bfloat16 for a float32 checkpoint on CUDA; float32 on a CPU without native bf16)",
    ),
    ("--device", str, "cuda or cpu (default: cuda when available, else cpu)"),
    ("--load-format", str, "auto, safetensors or dummy: random weights (default: auto)"),
    (
        "--quantization",
        str,
        "fp8 or int8 (quantize while loading), or the checkpoint's method (default: the "
        "checkpoint's quantization_config, if any)",
    ),
    (
        "--seed",
        int,
        "seed of the engine's random generator: the sampling of requests that bring no "
        "seed of their own, and dummy weights (default: 0)",
    ),
    (
        "--max-model-len",
        int,
        "context limit per request, prompt plus output (default: the model's "
        "max_position_embeddings)",
    ),
    ("--max-num-seqs", int, "most requests in one batch (default: 256)"),
    (
        "--max-num-batched-tokens",
        int,
        "most tokens in one step (default: max(8192, min(max-model-len, 16384)))",
    ),
    ("--block-size", int, "tokens per KV cache block (default: 16)"),
    (
        "--gpu-memory-utilization",
        float,
        "share of GPU memory the engine may use, KV cache included (default: 0.9)",
    ),
    (
        "--kv-cache-memory-bytes",
        int,
        "KV cache size in bytes (default: from --gpu-memory-utilization on CUDA; on the "
        "CPU LANNER_CPU_KVCACHE_SPACE GiB when set, else what --max-num-seqs requests of "
        "--max-model-len tokens can use, at most 2 GiB)",
    ),
    (
        "--num-gpu-blocks-override",
        int,
        "exact number of KV cache blocks (default: sized from memory)",
    ),
    (
        "--kv-cache-dtype",
        str,
        "auto (the model's dtype) or fp8 (e4m3: half the bytes) (default: auto)",
    ),
    (
        "--scheduling-policy",
        str,
        "fcfs, priority or lpm: longest cached prefix first (default: fcfs)",
    ),
    (
        "--num-threads",
        int,
        "CPU threads for the model's operations (default: OMP_NUM_THREADS when set, else "
        "the available cores but one)",
    ),
    (
        "--generation-config",
        str,
        "where requests' default sampling settings come from: auto (the model's "
        "generation_config.json), a folder holding one, or vllm (none: SamplingParams' "
        "own defaults) (default: auto)",
    ),
    (
        "--distributed-executor-backend",
        str,
        "how tensor-parallel workers run: mp or ray (default: mp)",
    ),
    (
        "--distributed-timeout-s",
        float,
        "seconds a step may wait on a tensor-parallel worker before the engine fails "
        "(default: 300)",
    ),
]


# Engine options that are off unless the flag is given.
_ENGINE_SWITCHES: list[tuple[str, str]] = [
    ("--enforce-eager", "never capture CUDA graphs (every step runs eagerly)"),
    ("--trust-remote-code", "allow the checkpoint's own tokenizer code"),
    (
        "--skip-tokenizer-init",
        "load no tokenizer: prompts must be token ids and outputs carry no text",
    ),
]

_MODEL_HELP = "model folder or Hub id (default: the embedded demo model)"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The model (positional, as vLLM takes it, or --model) and every engine option."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--model", default=None, help=f"the model, as a flag: {_MODEL_HELP}")
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


def resolve_model(args: argparse.Namespace) -> str:
    """The model named positionally or by --model (not both), else the demo model; stored
    back in ``args.model``."""
    tag, flag = getattr(args, "model_tag", None), args.model
    if tag is not None and flag is not None and tag != flag:
        raise ValueError(
            f"the model is given twice ({tag!r} and --model {flag!r}); name it once, "
            f"positionally or with --model"
        )
    args.model = tag or flag or str(DEFAULT_MODEL_DIR)
    return args.model


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the user set, as LLM(...) keyword arguments."""
    options: dict[str, Any] = {"model": resolve_model(args)}
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


# generate/chat sampling flags -> (SamplingParams field, type, help). Left out, a field
# takes the model's generation_config.json value, else the command's default below.
_SAMPLING_FLAGS: list[tuple[str, str, type, str]] = [
    ("--max-tokens", "max_tokens", int, "most tokens to generate (default: 128)"),
    ("--temperature", "temperature", float, "0 is greedy (default: the model's, else 0)"),
    ("--top-p", "top_p", float, "nucleus sampling mass (default: the model's, else 1.0: off)"),
    ("--top-k", "top_k", int, "sample from the k likeliest (default: the model's, else 0: off)"),
    ("--min-p", "min_p", float, "drop tokens below min-p x the top one (default: the model's, "
     "else 0.0: off)"),
    ("--repetition-penalty", "repetition_penalty", float,
     "divide repeated tokens' logits by this (default: the model's, else 1.0: off)"),
    ("--sample-seed", "seed", int, "seed of this request's sampling alone (default: none: "
     "the engine's --seed)"),
]  # fmt: skip
_COMMAND_SAMPLING_DEFAULTS = {"max_tokens": 128, "temperature": 0.0}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    for flag, _, kind, text in _SAMPLING_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument(
        "--stop", action="append", default=None, help="stop string, repeatable (default: none)"
    )


def _given_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling fields set on the command line."""
    given = {
        field: getattr(args, flag.removeprefix("--").replace("-", "_"))
        for flag, field, _, _ in _SAMPLING_FLAGS
    }
    given["stop"] = args.stop
    return {name: value for name, value in given.items() if value is not None}


def check_sampling_args(args: argparse.Namespace) -> None:
    """Fail on bad sampling flags before any engine is built (a ValueError that names
    the field)."""
    from lanner.sampling_params import SamplingParams

    SamplingParams(**{**_COMMAND_SAMPLING_DEFAULTS, **_given_sampling(args)})


def sampling_params(args: argparse.Namespace, llm: Any = None):  # noqa: ANN201
    """The request's SamplingParams: flags given, else the model's generation_config.json
    defaults (from ``llm``), else this command's (greedy, 128 tokens)."""
    from lanner.sampling_params import SamplingParams

    model_defaults = llm.get_default_sampling_params().to_dict() if llm is not None else {}
    values = {**_COMMAND_SAMPLING_DEFAULTS}
    for name in _generation_fields(llm):
        values[name] = model_defaults[name]
    return SamplingParams(**{**values, **_given_sampling(args)})


def _generation_fields(llm: Any) -> list[str]:
    return list(llm.engine.generation_defaults) if llm is not None else []


def run_generate(args: argparse.Namespace) -> int:
    check_sampling_args(args)  # a bad flag fails here, not after loading the model
    from lanner.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args, llm)
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
    check_sampling_args(args)
    from lanner.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args, llm)
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


def check_port_free(host: str, port: int) -> None:
    """Fail (ValueError) when ``host:port`` cannot be listened on, before the engine is
    built: a busy port would otherwise be found only after the model has loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"--host {host!r} is not an address this machine has: {err}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: SO_REUSEADDR lets a port in TIME_WAIT be taken, not a live one.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ValueError(
                f"cannot listen on {host}:{port} ({err.strerror or err}); another process "
                f"holds the port: stop it or pick another with --port"
            ) from None


def _server_packages_missing(err: ImportError) -> ValueError:
    return ValueError(
        f"`lanner serve` needs the server's packages ({err.name} is missing); "
        f"install them with: pip install 'lanner[serve]'"
    )


def run_serve(args: argparse.Namespace) -> int:
    from lanner.engine.config import EngineConfig
    from lanner.entrypoints.openai.limits import limits_from_args

    options = engine_kwargs(args)
    if options.get("skip_tokenizer_init"):
        raise ValueError(
            "`lanner serve` needs the tokenizer (it tokenizes prompts and streams text); "
            "--skip-tokenizer-init is for the offline LLM"
        )
    config = EngineConfig.from_kwargs(**options)
    limits = limits_from_args(args)
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ValueError(
            "--enable-auto-tool-choice and --tool-call-parser go together: tool_choice 'auto' "
            "needs the parser of the model's tool-call format"
        )
    check_port_free(args.host, args.port)
    try:
        from lanner.engine.core_client import AsyncCoreClient
    except ImportError as err:
        raise _server_packages_missing(err) from err
    # The engine core imports and loads the model in its own process: started first, that
    # overlaps with this process importing the server (a cold start's two largest parts).
    # (Data parallelism starts its cores itself, one per rank.)
    core = AsyncCoreClient(config) if getattr(args, "data_parallel_size", 1) == 1 else None
    if core is not None:
        core.launch()
    try:
        try:
            from lanner.entrypoints.openai.workers import start_fork_server

            # Likewise the process request workers fork from (it imports the tokenizer).
            start_fork_server(config.load.tokenizer or config.load.model)
            from lanner.entrypoints.openai.api_server import run_server
        except ImportError as err:
            raise _server_packages_missing(err) from err
        return run_server(args, options, limits, core)
    finally:
        if core is not None:
            core.shutdown()  # a no-op once the server has stopped it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lanner", description="lanner LLM inference engine", formatter_class=HelpFormatter
    )
    parser.add_argument("--log-level", default="INFO", help=_LOG_LEVEL_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI API over HTTP")
    add_engine_args(serve)
    _add_server_args(serve)
    _add_data_parallel_args(serve)
    serve.set_defaults(handler=run_serve)

    from lanner.entrypoints.router import args as router_args

    router = commands.add_parser("router", help="balance requests over several servers")
    router_args.add_router_args(router)
    router.set_defaults(handler=router_args.run_router_command)

    generate = commands.add_parser("generate", help="complete one prompt and report timings")
    add_engine_args(generate)
    generate.add_argument("prompt", help="the text to complete")
    add_sampling_args(generate)
    generate.set_defaults(handler=run_generate)

    chat = commands.add_parser("chat", help="chat interactively through the chat template")
    add_engine_args(chat)
    chat.add_argument("--system", default=None, help="system message (default: none)")
    add_sampling_args(chat)
    chat.set_defaults(handler=run_chat)

    _add_bench_parser(commands)
    _finish_subcommands(parser)
    return parser


_LOG_LEVEL_HELP = "DEBUG, INFO, WARNING or ERROR (default: INFO)"


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or any(default is unset for unset in (None, argparse.SUPPRESS, False))
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


def _finish_subcommands(parser: argparse.ArgumentParser) -> None:
    """Every subcommand, at every level, takes --log-level anywhere on its line and shows
    defaults in its help."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in action.choices.values():
            sub.formatter_class = HelpFormatter
            if "--log-level" not in sub._option_string_actions:
                # SUPPRESS: left out here, the value given before the subcommand stays.
                sub.add_argument("--log-level", default=argparse.SUPPRESS, help=_LOG_LEVEL_HELP)
            _finish_subcommands(sub)


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
    latency.add_argument("--batch-size", type=int, default=8, help="prompts in the batch")
    latency.add_argument("--input-len", type=int, default=32, help="prompt tokens each")
    latency.add_argument("--output-len", type=int, default=128, help="output tokens each")
    latency.add_argument("--num-iters", type=int, default=30, help="timed runs of the batch")
    latency.add_argument("--num-iters-warmup", type=int, default=3, help="untimed runs first")
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
        help="the model's tool-call format, for tool_choice 'auto' (default: none)",
    )
    parser.add_argument(
        "--metrics-prefix",
        choices=("lanner", "vllm"),
        default="lanner",
        help="/metrics names: lanner:* or vllm:* (vLLM's names, for its dashboards)",
    )
    add_limit_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level.upper()
    if level not in logging.getLevelNamesMapping():
        print(f"lanner: error: --log-level {args.log_level!r} is not one of {_LOG_LEVEL_HELP}")
        return 2
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # The engine core's process (spawned by `lanner serve`) logs at the same level.
    os.environ["LANNER_LOGGING_LEVEL"] = level
    # httpx logs every request at INFO: one line per request of `lanner bench serve`.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"lanner: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
