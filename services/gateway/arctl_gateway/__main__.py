"""``python -m arctl_gateway [--config gateway.yaml] [--worker URL ...] [--set key=value ...]``.

``python -m arctl_gateway hash-key`` reads a key on stdin and prints the sha256 digest to put in
``auth.api_key_sha256``. Bad settings: one line ``error: ...`` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from arctl.logs import configure_logging
from arctl_gateway.config import ConfigError, GatewayConfig, hash_key, load_config, parse_set
from arctl_gateway.server import run

USAGE_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m arctl_gateway", description="OpenAI-compatible gateway.")
    parser.add_argument("--config", type=Path, help="YAML settings file.")
    parser.add_argument("--host", help="Listen address (ARCTL_GATEWAY_HOST).")
    parser.add_argument("--port", type=int, help="Listen port (ARCTL_GATEWAY_PORT).")
    parser.add_argument("--worker", action="append", default=[], help="Worker URL or id=URL (repeatable).")
    parser.add_argument("--max-concurrency", type=int, help="Requests running at once.")
    parser.add_argument("--max-queue", type=int, help="Requests waiting for a slot before 429.")
    parser.add_argument("--log-level", help="debug, info, warning, error.")
    parser.add_argument("--log-format", help="auto, pretty, json.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Any setting, e.g. timeouts.total_s=60.")
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    tree = parse_set(args.set)
    for name in ("host", "port", "log_level", "log_format"):
        if getattr(args, name) is not None:
            tree[name] = getattr(args, name)
    for name in ("max_concurrency", "max_queue"):
        if getattr(args, name) is not None:
            tree.setdefault("limits", {})[name] = getattr(args, name)
    if args.worker:
        tree["workers"] = list(args.worker)
    return tree


def settings(argv: list[str]) -> GatewayConfig:
    args = build_parser().parse_args(argv)
    return load_config(args.config, overrides_from(args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-key"]:
        key = sys.stdin.readline().strip()
        if not key:
            print("error: give the key on stdin", file=sys.stderr)
            return USAGE_ERROR
        print(hash_key(key))
        return 0
    try:
        config = settings(argv)
        configure_logging(config.log_level, config.log_format)
    except (ConfigError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return USAGE_ERROR
    if not config.workers and not config.auth.admin_key_sha256:
        print("error: no workers: give --worker URL, workers: in the config, or ARCTL_GATEWAY_WORKERS "
              "(or an admin key to add them at run time)", file=sys.stderr)
        return USAGE_ERROR
    try:
        run(config)
    except OSError as exc:
        print(f"error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
