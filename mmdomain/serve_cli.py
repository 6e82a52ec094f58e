"""`mmdomain serve RUN`: a trained run behind an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from typing import Any

from .errors import MmdomainError

log = logging.getLogger(__name__)
API_KEY_ENV = "MMDOMAIN_API_KEY"


class ServeSetupError(MmdomainError, RuntimeError):
    """`mmdomain serve` cannot start: the extra is missing, or its options do not fit; the message says the fix."""


def add_serve_command(sub: Any) -> None:
    from .generate_cli import add_device_argument
    from .serve_app import ServeLimits
    from .serve_media import MediaPolicy

    limits, media = ServeLimits(), MediaPolicy()
    p = sub.add_parser("serve", help="serve a trained run over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models)")
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send and /v1/models lists (default: the run's folder name)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV}, which keeps the key out of `ps`)")
    p.add_argument("--allow-media-from", action="append", default=[], metavar="PREFIX",
                   help="also accept media URLs under PREFIX (https://host/path/ or file:///dir/); repeat for several. "
                        "Without it only data: URLs are accepted")
    p.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="largest request body (and fetched media file)")
    p.add_argument("--max-media-items", type=int, default=media.max_items, help="most media items in one request")
    p.add_argument("--max-pixels", type=int, default=media.max_pixels, help="largest image, width x height x frames")
    p.add_argument("--max-tokens-limit", type=int, default=limits.max_tokens, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=limits.default_max_tokens, help="max_tokens of a request that gives none")
    p.add_argument("--max-beams", type=int, default=limits.max_beams, help="largest num_beams a request may ask for")
    p.add_argument("--max-waiting", type=int, default=limits.max_waiting,
                   help="requests that may wait for the model (one runs at a time); more get 503")
    add_device_argument(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as exc:
        raise ServeSetupError(f"mmdomain serve needs {exc.name}, which comes with an optional extra: pip install 'mmdomain[serve]'") from None
    from .inference_run import load_for_inference
    from .serve_app import ServeLimits, create_app
    from .serve_media import MediaPolicy

    for name in ("max_body_bytes", "max_media_items", "max_pixels", "max_tokens_limit", "default_max_tokens", "max_waiting", "max_beams"):
        if getattr(args, name) < (0 if name == "max_waiting" else 1):
            raise ServeSetupError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.default_max_tokens > args.max_tokens_limit:
        raise ServeSetupError(f"--default-max-tokens {args.default_max_tokens} is over --max-tokens-limit {args.max_tokens_limit}")
    for prefix in args.allow_media_from:
        if not prefix.lower().startswith(("http://", "https://", "file:///")):
            raise ServeSetupError(f"--allow-media-from {prefix!r} must start with http://, https:// or file:///")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who reaches this port can use the model (set %s or --api-key)",
                    args.host, API_KEY_ENV)
    sock = listening_socket(args.host, args.port)  # a port in use is said now, not after minutes of loading a model
    try:
        run = load_for_inference(args.checkpoint, args.device, args.dtype)
    except BaseException:
        sock.close()
        raise
    media = MediaPolicy(max_items=args.max_media_items, max_pixels=args.max_pixels, max_bytes=args.max_body_bytes,
                        allow_from=tuple(args.allow_media_from))
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                         max_waiting=args.max_waiting, max_beams=args.max_beams, media=media)
    name = args.model_name or run.name
    app = create_app(run.model, run.processor, device=run.device, model_name=name, limits=limits, api_key=api_key)
    log.info("serving %s (%s) as %r on http://%s:%d/v1 (device %s)", run.checkpoint, "API key required" if api_key else "no API key",
             name, args.host, args.port, run.device)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to serve on, or a ServeSetupError naming them and the fix. uvicorn's
    own bind came after the model had loaded and ended the process with its log line and status 1."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart is not refused by TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeSetupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port, or stop the server "
                              "using that one") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
