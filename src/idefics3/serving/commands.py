"""The `idefics3 serve` command: its flags, checked and turned into `ServeOptions`.

    idefics3 serve --model HuggingFaceTB/SmolVLM-256M-Instruct     # http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from ..dtypes import DEVICES, SHORT_NAMES


def add_serve_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", parents=parents, help="an OpenAI-compatible HTTP server (chat, completions, images)",
                       description="Serve the model over HTTP with the OpenAI API: POST /v1/chat/completions, "
                                   "/v1/completions, GET /v1/models, /health, /metrics, POST /tokenize, /detokenize.")
    net = p.add_argument_group("network and safety")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                                                     "(default: $IDEFICS3_API_KEY)")
    net.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: the "
                                                                 "checkpoint folder's name)")
    net.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="HOST",
                     help="hosts whose http(s) images may be fetched (default: none; data: URIs always work)")
    net.add_argument("--allowed-local-media-path", type=Path, metavar="DIR",
                     help="allow file:// images inside this directory")
    net.add_argument("--media-timeout", type=float, default=5.0, metavar="S", help="remote image fetch timeout")
    net.add_argument("--max-image-mb", type=float, default=20.0, help="encoded bytes per image")
    net.add_argument("--max-images-per-request", type=int, default=8)
    net.add_argument("--max-tiles-per-request", type=int, default=64, help="image frames per request")
    net.add_argument("--max-prompt-tokens", type=int, default=8192)
    net.add_argument("--max-body-mb", type=float, default=32.0, help="request body size limit")
    net.add_argument("--cors-origins", nargs="*", default=[], metavar="ORIGIN", help="CORS allowed origins "
                                                                                   "(default: CORS off)")
    net.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    net.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM, how long running requests may take to finish")
    eng = p.add_argument_group("engine")
    eng.add_argument("--dtype", choices=SHORT_NAMES)
    eng.add_argument("--mmproj", metavar="FILE", help="the vision projector GGUF of a --model .gguf text model")
    eng.add_argument("--quantize", metavar="FORMAT", help="quantise the weights while loading: int8, int4, "
                                                          "int4-g64, int4-g128, int4-asym, int8-channel")
    eng.add_argument("--device", choices=list(DEVICES))
    eng.add_argument("--max-batch", type=int, default=16, help="sequences in flight at once")
    eng.add_argument("--max-seq-len", type=int, default=None, help="prompt + answer per sequence (default: 4096 "
                                                                   "or the model's context if shorter)")
    eng.add_argument("--max-prefill-chunk", type=int, default=512, metavar="TOKENS",
                     help="prefill work per engine step while others decode (0: unbounded)")
    eng.add_argument("--prefix-cache-slots", type=int, default=None,
                     help="extra KV-cache rows that keep finished conversations (default: max-batch / 2)")
    eng.add_argument("--no-prefix-cache", action="store_true", help="never reuse keys/values across requests")
    eng.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .media import MediaPolicy
    from .prompts import Limits
    from .server import ServeOptions, serve

    for name in ("port", "max_batch", "max_images_per_request", "max_tiles_per_request", "max_prompt_tokens",
                 "max_queue"):
        if getattr(args, name) < 1 and not (name == "port" and getattr(args, name) == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_image_mb", "max_body_mb", "media_timeout", "shutdown_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_prefill_chunk < 0 or (args.prefix_cache_slots is not None and args.prefix_cache_slots < 0):
        raise ValueError("--max-prefill-chunk and --prefix-cache-slots must be >= 0")
    media = MediaPolicy(allowed_domains=tuple(args.allowed_media_domains),
                        allowed_local_path=args.allowed_local_media_path, timeout=args.media_timeout,
                        max_bytes=int(args.max_image_mb * 2**20))
    options = ServeOptions(
        model=args.model, mmproj=args.mmproj, quantize=args.quantize, host=args.host, port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key if args.api_key is not None else os.environ.get("IDEFICS3_API_KEY"),
        dtype=args.dtype, device=args.device, longest_edge=args.longest_edge, split=not args.no_split,
        max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_prefill_chunk=args.max_prefill_chunk or None,
        prefix_cache=not args.no_prefix_cache, prefix_cache_slots=args.prefix_cache_slots, max_queue=args.max_queue,
        shutdown_timeout=args.shutdown_timeout, max_body_bytes=int(args.max_body_mb * 2**20),
        cors_origins=list(args.cors_origins), media=media,
        limits=Limits(args.max_images_per_request, args.max_tiles_per_request, args.max_prompt_tokens))
    logging.getLogger("idefics3").setLevel(getattr(logging, args.log_level.upper()))
    return serve(options, log_level=args.log_level)
