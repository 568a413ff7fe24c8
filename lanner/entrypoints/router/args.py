"""The flags of `lanner router` (standard library only, so `lanner --help` stays fast and
works without the server's packages), and the command that runs it."""

from __future__ import annotations

import argparse
import os

from lanner.engine.routing import POLICIES

POLICY_NAMES = tuple(POLICIES)
WORKER_API_KEY_ENV = "LANNER_WORKER_API_KEY"


_CACHE_AWARE_FLAGS: list[tuple[str, type, float, str]] = [
    ("--cache-threshold", float, 0.5,
     "route by prefix when a worker holds at least this share of the prompt"),
    ("--balance-abs-threshold", int, 32,
     "load is out of balance when max - min outstanding requests exceeds this..."),
    ("--balance-rel-threshold", float, 1.5,
     "...and max exceeds min times this; then load alone decides"),
    ("--max-tree-size", int, 1 << 22,
     "characters (or tokens) of prompts remembered per worker; LRU beyond"),
]  # fmt: skip
_HEALTH_FLAGS: list[tuple[str, type, float, str]] = [
    ("--health-check-interval", float, 2.0,
     "seconds between polls of each worker's /health and /metrics"),
    ("--health-check-timeout", float, 5.0, "seconds a poll may take"),
    ("--health-check-max-backoff", float, 10.0,
     "longest wait, in seconds, between polls of a failing worker"),
]  # fmt: skip


def add_router_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-urls", nargs="+", default=[], metavar="URL",
        help="the replicas, e.g. http://127.0.0.1:8001 (more can join with POST /workers)",
    )  # fmt: skip
    parser.add_argument("--policy", choices=POLICY_NAMES, default="cache_aware",
                        help="how a worker is picked (default: cache_aware)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on all but /health (default: "
        "$LANNER_API_KEY)",
    )  # fmt: skip
    parser.add_argument(
        "--worker-api-key", default=None,
        help="the key the workers want (default: $LANNER_WORKER_API_KEY; unset, the "
        "client's Authorization header is passed on)",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-hosts", nargs="+", default=None, metavar="HOST",
        help="names the Host header may carry, '*' for any (default: bound to loopback, "
        "only loopback names; else any)",
    )  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20,
                        help="largest request body accepted (default: 8 MiB)")  # fmt: skip
    group = parser.add_argument_group("cache_aware (sgl-router's knobs)")
    for flag, kind, default, text in _CACHE_AWARE_FLAGS:
        group.add_argument(flag, type=kind, default=default, help=text)
    health = parser.add_argument_group("health")
    for flag, kind, default, text in _HEALTH_FLAGS:
        health.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--uvicorn-log-level", default="info", help="uvicorn's log level")
    parser.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="no log line per request (about a tenth of the router's CPU per request)",
    )


def run_router_command(args: argparse.Namespace) -> int:
    try:
        from lanner.engine.routing import CacheAwareConfig
        from lanner.entrypoints.http_guards import api_key_from, default_allowed_hosts
        from lanner.entrypoints.router.app import RouterOptions, run_router
        from lanner.entrypoints.router.workers import HealthOptions
    except ImportError as err:
        raise ValueError(
            f"`lanner router` needs the server's packages ({err.name} is missing); "
            f"install them with: pip install 'lanner[serve]'"
        ) from err
    options = RouterOptions(
        worker_urls=args.worker_urls,
        policy=args.policy,
        cache_aware=CacheAwareConfig(
            cache_threshold=args.cache_threshold,
            balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold,
            max_tree_size=args.max_tree_size,
        ),
        health=HealthOptions(
            interval_s=args.health_check_interval,
            timeout_s=args.health_check_timeout,
            max_backoff_s=args.health_check_max_backoff,
        ),
        api_key=api_key_from(args.api_key),
        worker_api_key=args.worker_api_key or os.environ.get(WORKER_API_KEY_ENV) or None,
        allowed_hosts=args.allowed_hosts
        if args.allowed_hosts is not None
        else default_allowed_hosts(args.host),
        max_body_bytes=args.max_body_bytes,
    )
    return run_router(
        options,
        args.host,
        args.port,
        args.uvicorn_log_level.lower(),
        access_log=not args.disable_uvicorn_access_log,
    )
