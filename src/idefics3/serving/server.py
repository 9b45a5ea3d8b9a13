"""`idefics3 serve`: load the model, start the engine thread, serve the app with uvicorn, drain on SIGTERM.

The socket opens first and the model loads on a background thread, so `/health` answers 503 ("loading")
until the engine is ready and 200 after. SIGTERM or SIGINT starts draining: `/health` and new requests get
503 while running requests finish, for at most `shutdown_timeout` seconds; then uvicorn closes the remaining
connections and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from ..generation.engine import Engine
from ..loading import load_model, load_processor, resolve_model
from .app import ServerState, build_app
from .grammar import JsonGrammars
from .media import MediaPolicy
from .prompts import Limits, PromptBuilder
from .runner import EngineRunner, describe

logger = logging.getLogger("idefics3.serving")


@dataclass
class ServeOptions:
    model: str | None = None
    mmproj: str | None = None  # the vision projector of a GGUF text model
    quantize: str | None = None  # quantise a dense checkpoint while loading ("int8", "int4", ...)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    dtype: str | None = None
    device: str | None = None
    longest_edge: int | None = None
    split: bool = True
    max_batch: int = 16
    max_seq_len: int | None = None
    max_prefill_chunk: int | None = 512
    prefix_cache: bool = True
    prefix_cache_slots: int | None = None  # default: max_batch // 2
    max_queue: int = 256
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 32 * 2**20
    cors_origins: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    media: MediaPolicy = field(default_factory=MediaPolicy)


def model_name(ref: str | None, folder: Path) -> str:
    """What clients put in `model`: the last part of the Hub id or folder (SmolVLM-256M-Instruct); the built-in
    demo model is "idefics3-demo"."""
    from .. import DEMO_MODEL

    if folder.resolve() == DEMO_MODEL.resolve():
        return "idefics3-demo"
    return Path(str(ref)).name if ref else folder.name


def load(state: ServerState, options: ServeOptions) -> None:
    """Load model, processor and engine into the state (on a background thread); the state becomes "ok"."""
    try:
        folder = resolve_model(options.model)
        model = load_model(folder, options.dtype, options.device, mmproj=options.mmproj, quantize=options.quantize)
        processor = load_processor(folder, options.longest_edge, options.split, mmproj=options.mmproj)
        slots = options.max_batch // 2 if options.prefix_cache_slots is None else options.prefix_cache_slots
        engine = Engine(model, max_batch=options.max_batch, max_seq_len=options.max_seq_len,
                        max_prefill_chunk=options.max_prefill_chunk, encoder_cache=model.encoder_cache,
                        prefix_cache=options.prefix_cache, prefix_cache_slots=slots if options.prefix_cache else 0)
        tokenizer_json = folder / "tokenizer.json"
        grammars = JsonGrammars(tokenizer_json, model.config.text_config.vocab_size,
                                sorted(engine.eos_token_ids)) if tokenizer_json.is_file() else None
        limits = dataclasses.replace(options.limits, max_prompt_tokens=min(options.limits.max_prompt_tokens,
                                                                           engine.max_seq_len - 1))
        runner = EngineRunner(engine, options.max_queue)
        runner.start()
        state.processor, state.grammars, state.runner = processor, grammars, runner
        state.builder = PromptBuilder(processor, options.media, limits)
        state.max_model_len = engine.max_seq_len
        state.status = "ok"
        backend = getattr(model, "backend", None)
        kernels = "\n  ".join(backend.describe()) if backend is not None else "plain PyTorch"
        logger.info("serving %s from %s: %s\n  %s", state.model_name, folder, describe(engine), kernels)
    except Exception as err:  # noqa: BLE001 - reported on /health and in the log; the process keeps answering
        state.status, state.load_error = "failed", f"{type(err).__name__}: {err}"
        logger.exception("could not load the model")


class Server(uvicorn.Server):
    """uvicorn's server with draining: the first signal drains, the second stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining:
            self.force_exit = True
            self.should_exit = True
            return
        self.drain()

    def drain(self) -> None:
        self._draining = True
        if self.state.status == "ok":
            self.state.status = "draining"
        runner = self.state.runner
        if runner is None:
            self.should_exit = True
            return
        runner.start_draining()
        logger.info("draining: finishing running requests (at most %.0f s)", self.shutdown_timeout)

        def wait() -> None:
            if not runner.wait_idle(self.shutdown_timeout):
                logger.warning("shutdown timeout: %d sequence(s) still running are cut off",
                               runner.snapshot().get("running", 0))
            self.should_exit = True

        threading.Thread(target=wait, daemon=True, name="idefics3-drain").start()


def create_server(options: ServeOptions, log_level: str = "info") -> tuple[Server, ServerState, threading.Thread]:
    """The server (not started), its state and the loader thread (started)."""
    folder = resolve_model(options.model)
    state = ServerState(model_name=options.served_model_name or model_name(options.model, folder),
                        api_key=options.api_key if options.api_key is not None else os.environ.get("IDEFICS3_API_KEY")
                        or None, max_body_bytes=options.max_body_bytes, cors_origins=list(options.cors_origins))
    app = build_app(state)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = Server(config, state, options.shutdown_timeout)
    loader = threading.Thread(target=load, args=(state, options), daemon=True, name="idefics3-load")
    loader.start()
    return server, state, loader


def serve(options: ServeOptions, log_level: str = "info") -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean drain."""
    server, state, _ = create_server(options, log_level)
    if options.host not in ("127.0.0.1", "localhost", "::1") and state.api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                       "(set --api-key or IDEFICS3_API_KEY)", options.host)
    server.run()
    if state.runner is not None:
        state.runner.stop()
    return 0
