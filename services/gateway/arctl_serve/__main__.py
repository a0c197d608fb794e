"""``python -m arctl_serve MODEL [--port 30000] [--served-model-name NAME]``: load the model, serve the
OpenAI API on CPU until SIGTERM/SIGINT (requests in flight finish first, up to ``--drain-timeout``).

MODEL: a QuantizedCheckpoint folder, an exported folder (auto_round), a float folder, a .gguf file
or ``smollm2``. Bad input: one line ``error: ...`` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import torch
from aiohttp import web
from transformers.utils import logging as transformers_logging

from arctl.checkpoint import CheckpointError
from arctl.logs import configure_logging, get_logger
from arctl.models import ModelNotFoundError, UnsafeModelError, resolve_model
from arctl_serve.generation import Generator, load_for_serving
from arctl_serve.quantinfo import describe
from arctl_serve.server import EngineServer

USAGE_ERROR = 2
log = get_logger("arctl.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m arctl_serve", description="Embedded CPU OpenAI-compatible engine.")
    parser.add_argument("model", help="Checkpoint folder, exported folder, float folder, .gguf file or 'smollm2'.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--served-model-name", default=None, help="Model id in the API (default: the folder name).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--max-running-requests", type=int, default=4)
    parser.add_argument("--default-max-tokens", type=int, default=256, help="Chat max_tokens when the request has none.")
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="auto")
    return parser


async def serve(server: EngineServer, host: str, port: int, drain_timeout: float) -> None:
    runner = web.AppRunner(server.build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=drain_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("engine listening", host=host, port=port, model=server.served_name, quantization=server.quantization)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    server.executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        served = load_for_serving(args.model)
    except (ModelNotFoundError, UnsafeModelError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return USAGE_ERROR
    path = Path(args.model)
    name = args.served_model_name or (path.name if path.exists() else args.model)
    kind, location = resolve_model(args.model) if not path.is_dir() else ("folder", path)
    quantization = describe(location) if kind != "hub" else {"format": "unknown"}
    server = EngineServer(
        Generator(served), name, served.path, quantization, args.max_running_requests, args.default_max_tokens
    )
    try:
        asyncio.run(serve(server, args.host, args.port, args.drain_timeout))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
