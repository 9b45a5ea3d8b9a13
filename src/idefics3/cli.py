"""The `idefics3` command line: `generate`, `chat`, `info`, `demo` / `eval` (demo/commands.py), `finetune` /
`merge` (finetune/cli.py) and `serve` (serving/commands.py).

    idefics3 generate --model HuggingFaceTB/SmolVLM-256M-Instruct --image cat.jpg "What is in this image?"
    idefics3 chat --model ./my-checkpoint
    idefics3 info --model ./my-checkpoint --longest-edge 1024

A thin layer: parse arguments, call the library (processor, model, `generate`), print. The answer
streams to stdout; notices go to stderr. Bad input (a missing image, a folder that is not a
checkpoint, an unknown flag) prints one `idefics3: error: ...` line and exits non-zero; `--debug`
shows the traceback instead.

The model is `--model`, else the IDEFICS3_MODEL environment variable, else `idefics3.DEMO_MODEL`
when the package defines it and that folder exists; otherwise the command says how to name one.
Heavy imports (torch, the model) happen inside the commands, so `--help` and argument errors are fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from .dtypes import DEVICES, SHORT_NAMES

PROG = "idefics3"
DEFAULT_MAX_NEW_TOKENS = 512
CHAT_HELP = "commands: /image PATH (attach an image to your next message), /reset (forget the conversation), /quit"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


# ---- arguments ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", "-m", help="checkpoint folder or Hub id (default: $IDEFICS3_MODEL, "
                                              "else the demo model if installed)")
    common.add_argument("--longest-edge", type=int, metavar="PX",
                        help="resize images so their longest edge is PX (fewer tiles, fewer tokens)")
    common.add_argument("--no-split", action="store_true", help="do not cut images into tiles (one frame each)")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--dtype", choices=SHORT_NAMES,
                     help="weights dtype (default: bf16 on cuda and on CPUs with bf16 instructions, fp16 on mps, "
                          "else fp32)")
    run.add_argument("--device", choices=list(DEVICES), help="default: cuda if available, else cpu")
    run.add_argument("--mmproj", metavar="FILE", help="the vision projector GGUF of a --model .gguf text model "
                                                      "(without it a GGUF model answers text only)")
    run.add_argument("--quantize", metavar="FORMAT", help="quantise the weights while loading: int8, int4, "
                                                          "int4-g64, int4-g128, int4-asym, int8-channel")
    run.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N")
    run.add_argument("--temperature", type=float, metavar="T", help="sample with temperature T (0: greedy)")
    run.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling")
    run.add_argument("--seed", type=int, metavar="S", help="seed for sampling")

    parser = _Parser(prog=PROG, description="Idefics3 / SmolVLM vision-language models from the command line.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser("generate", parents=[common, run], help="answer one prompt, streamed to stdout",
                         description="Answer one prompt; each --image becomes an image before the text, unless "
                                     "the prompt places <image> itself.")
    gen.add_argument("--image", "-i", action="append", default=[], metavar="PATH_OR_URL",
                     help="an image file or http(s) URL (repeatable)")
    gen.add_argument("prompt", help='the question ("-" reads it from stdin)')
    gen.set_defaults(run=cmd_generate)
    chat = sub.add_parser("chat", parents=[common, run], help="interactive multi-turn conversation",
                          description=f"Talk with the model; {CHAT_HELP}.")
    chat.set_defaults(run=cmd_chat)
    info = sub.add_parser("info", parents=[common], help="configuration, parameters, tokens per image, kernels")
    info.add_argument("--no-backend", dest="backend", action="store_false",
                      help="skip loading the model to show which kernel runs each op")
    info.add_argument("--dtype", choices=SHORT_NAMES, help="weights dtype for the kernel choices (as generate)")
    info.add_argument("--device", choices=list(DEVICES), help="device for the kernel choices (as generate)")
    info.add_argument("--mmproj", metavar="FILE", help="the vision projector GGUF of a --model .gguf text model")
    info.set_defaults(run=cmd_info)
    quant = sub.add_parser("quantize", parents=[common], help="write an int8 / int4 copy of a checkpoint",
                           description="Quantise a checkpoint's weights (int8, or int4 in groups; see the README's "
                                       "Quantisation section for what is quantised) and write a folder that "
                                       "--model takes anywhere.")
    quant.add_argument("--bits", type=int, choices=(4, 8), default=4)
    quant.add_argument("--group-size", type=int, choices=(0, 32, 64, 128), default=32,
                       help="inputs per scale (0: one scale per output channel, int8 only)")
    quant.add_argument("--head-bits", type=int, choices=(4, 8), default=8,
                       help="format of the output head (groups of 32), and of the token embeddings where the "
                       "head is tied to them (else they take --bits)")
    quant.add_argument("--asymmetric", action="store_true",
                       help="int4 with a minimum per group as well as a scale (llama.cpp's Q4_1: 5 bits per weight "
                            "instead of 4.5, closer to the original)")
    quant.add_argument("--include-vision", action="store_true", help="quantise the vision tower's linears too")
    quant.add_argument("--calibration", metavar="FILE|self",
                       help="a UTF-8 text file: quantise the text decoder by GPTQ on the inputs this text gives "
                            "each layer (closer to the original than rounding; slower to make); `self`: on text "
                            "the model first writes itself (answers to varied requests, sampled with a fixed seed)")
    quant.add_argument("--calibration-tokens", type=int, default=4096, metavar="N",
                       help="how many tokens of --calibration to use (default 4096, in windows of 512)")
    quant.add_argument("--mmproj", metavar="FILE", help="with a --model .gguf text model: its vision projector GGUF "
                                                        "(a GGUF pair is converted as it is, without requantising)")
    quant.add_argument("--output", "-o", required=True, help="folder to write")
    quant.set_defaults(run=cmd_quantize)
    from .demo.commands import add_demo_parser, add_eval_parser  # the built-in model's demo and evaluation

    add_demo_parser(sub, [common])
    add_eval_parser(sub, [common])
    from .finetune.cli import add_finetune_parser, add_merge_parser  # training: LoRA or full, and merging

    add_finetune_parser(sub)
    add_merge_parser(sub)
    from .serving.commands import add_serve_parser  # the OpenAI-compatible server

    add_serve_parser(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format=f"{PROG}: %(message)s")
    logging.getLogger("idefics3.kernels.build").setLevel(logging.DEBUG if debug else logging.INFO)  # "compiling"
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as err:  # noqa: BLE001 - the CLI turns every failure into one line
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = text[0] if text else type(err).__name__
    if isinstance(err, (CliError, ValueError, FileNotFoundError, OSError)) or "Error" in type(err).__name__:
        return message
    return f"{type(err).__name__}: {message}"


# ---- loading ------------------------------------------------------------------------------------------
def model_folder(args: argparse.Namespace) -> Path:
    """The checkpoint folder named by --model / $IDEFICS3_MODEL / the built-in demo model."""
    from .loading import resolve_model

    return resolve_model(args.model)


def open_model(args: argparse.Namespace) -> tuple[Path, Any, Any]:
    """(folder, processor, model) as the flags say."""
    from .loading import load_model, load_processor

    folder = model_folder(args)
    processor = load_processor(folder, longest_edge=args.longest_edge, split=not args.no_split, mmproj=args.mmproj)
    model = load_model(folder, dtype=args.dtype, device=args.device, mmproj=args.mmproj, quantize=args.quantize)
    return folder, processor, model


def load_images(sources: list[str]) -> list[Any]:
    from .processing.load import load_image

    return [load_image(src) for src in sources]


# ---- generate -----------------------------------------------------------------------------------------
def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.max_new_tokens < 0:
        raise CliError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    sample = (args.temperature is not None and args.temperature > 0) or \
             (args.top_p is not None and args.temperature != 0)
    if args.temperature is not None and args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    settings["do_sample"] = sample
    if sample:
        settings.update(temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed)
    return settings


def stream_answer(model: Any, processor: Any, messages: list[dict], images: list[Any],
                  settings: dict[str, Any], out: TextIO) -> str:
    """Ask and print the answer as it comes (then a newline). Returns the answer text."""
    from .loading import ask

    def emit(text: str) -> None:
        out.write(text)
        out.flush()

    reply = ask(model, processor, messages, images, on_text=emit, **settings)
    out.write("\n")
    out.flush()
    return reply


def cmd_generate(args: argparse.Namespace) -> int:
    from .loading import user_turn

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model_folder(args)  # a missing model fails before the images are read
    images = load_images(args.image)  # bad images fail before the (slow) model load
    turn = user_turn(prompt, len(images))
    settings = generation_settings(args)
    _, processor, model = open_model(args)
    stream_answer(model, processor, [turn], images, settings, sys.stdout)
    return 0


# ---- chat ---------------------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    settings = generation_settings(args)
    folder, processor, model = open_model(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {folder.name}; {CHAT_HELP}.", file=sys.stderr)
    history: list[dict] = []
    images: list[Any] = []   # every image of the conversation, in order
    pending: list[Any] = []  # attached to the next message
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                history, images, pending = [], [], []
                print("(conversation cleared)", file=sys.stderr)
            elif command == "/image":
                _attach(rest.strip(), pending)
            else:
                print(f"{PROG}: unknown command {command}; {CHAT_HELP}", file=sys.stderr)
            continue
        turn = {"role": "user", "content": [{"type": "image"}] * len(pending) + [{"type": "text", "text": line}]}
        try:
            reply = stream_answer(model, processor, [*history, turn], [*images, *pending], settings, sys.stdout)
        except ValueError as err:  # e.g. the conversation outgrew the context: keep the session alive
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        images += pending
        pending = []
    return 0


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def _attach(source: str, pending: list[Any]) -> None:
    from .processing.load import ImageLoadError

    if not source:
        print(f"{PROG}: /image needs a path or URL", file=sys.stderr)
        return
    try:
        pending.extend(load_images([source]))
    except ImageLoadError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return
    print(f"(image attached to your next message: {source})", file=sys.stderr)


# ---- quantize -----------------------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> int:
    from .loading import Idefics3ForConditionalGeneration, is_gguf, load_processor
    from .quant import plan, quantize_model, quantized_nbytes

    folder = model_folder(args)
    output = Path(args.output)
    if output.resolve() == folder.resolve():
        raise CliError("--output must not be the checkpoint folder itself")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CliError(f"--output {output} exists and is not an empty folder")
    if args.calibration is not None and is_gguf(folder):
        raise CliError("--calibration quantises dense weights; a GGUF file is converted as it is")
    processor = load_processor(folder, mmproj=args.mmproj)
    calibration = _calibration(args, processor)  # a bad file is refused before the weights are read
    model = Idefics3ForConditionalGeneration.from_pretrained(folder, backend="torch", mmproj=args.mmproj)
    if is_gguf(folder):  # llama.cpp's blocks are our formats already: converted as they are
        model.save_pretrained(output)
        processor.save_pretrained(output)
        print(f"{model.quantization.summary()} (from {folder.name}, not requantised); written to {output}")
        return 0
    if getattr(model, "quantization", None) is not None:
        raise CliError(f"{folder} is already quantised ({model.quantization.summary()})")
    dense = quantized_nbytes(model)
    if args.asymmetric and args.bits != 4:
        raise CliError("--asymmetric is an int4 format (use it with --bits 4)")
    config = plan(model, args.bits, args.group_size, args.include_vision, args.head_bits, args.asymmetric)
    if args.calibration == SELF_CALIBRATION:  # after every cheap check: writing the text takes a while
        from .quant import self_calibration

        print(f"writing {args.calibration_tokens} tokens of calibration text with the model ...", file=sys.stderr)
        calibration = self_calibration(model, processor, args.calibration_tokens)
    quantize_model(model, config, calibration)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    size = quantized_nbytes(model)
    print(f"{config.summary()}; {config.source}")
    for name, why in config.dense.items():
        print(f"  kept dense: {name} ({why})")
    print(f"weights: {dense / 2**20:.1f} MiB -> {size / 2**20:.1f} MiB ({100 * size / dense:.0f}%), "
          f"written to {output}")
    return 0


SELF_CALIBRATION = "self"  # --calibration self: the model writes its own calibration text


def _calibration(args: argparse.Namespace, processor: Any) -> Any:
    """--calibration's text as token windows [W, T] (a tensor), or None without it (or for `self`)."""
    if args.calibration is None:
        return None
    from .quant.gptq import calibration_windows

    if args.calibration_tokens < 16:
        raise CliError(f"--calibration-tokens must be at least 16, got {args.calibration_tokens}")
    if args.calibration == SELF_CALIBRATION:
        return None  # written by the model once it is loaded (cmd_quantize)
    path = Path(args.calibration)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"--calibration {path}: cannot be read as UTF-8 text ({_one_line(err)})") from None
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [i for i in ids if i != processor.image_token_id]  # "<image>" in the text would ask for pixels
    try:
        return calibration_windows(ids, args.calibration_tokens)
    except ValueError as err:
        raise CliError(f"--calibration {path}: {err}") from None


# ---- info ---------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .config import Idefics3Config
    from .loading import is_gguf, load_model, load_processor

    folder = model_folder(args)
    processor = load_processor(folder, longest_edge=args.longest_edge, split=not args.no_split, mmproj=args.mmproj)
    model = None
    if is_gguf(folder):  # no config.json nor safetensors to read: the model itself says what it is
        model = load_model(folder, dtype=args.dtype, device=args.device, mmproj=args.mmproj)
        config = model.config
        counts = _count_parts({k: v.numel() for k, v in model.state_dict().items() if not v.is_meta}, config)
    else:
        config = Idefics3Config.from_pretrained(folder)
        counts = parameter_counts(folder, config)
    for line in describe(folder, config, processor, counts):
        print(line)
    quantization = config.extra.get("quantization_config")
    if quantization is not None:
        from .quant import QuantConfig

        print(f"quantised:   {QuantConfig.from_dict(quantization).summary()} "
              f"({quantization.get('source', '')})")
    if args.backend:
        model = model or load_model(folder, dtype=args.dtype, device=args.device)
        from .device import cpu_description

        print(f"kernels:     {cpu_description()}, torch {_torch_version()}, dtype {str(model.dtype)[6:]}")
        for line in model.backend.describe():
            print(f"  {line}")
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


def describe(folder: Path, config: Any, processor: Any, counts: dict[str, int]) -> list[str]:
    """The lines `idefics3 info` prints (counts: weights per part, `parameter_counts`)."""
    from PIL import Image

    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    total = sum(counts.values())
    parts = ", ".join(f"{name} {_human(n)}" for name, n in counts.items() if n)
    settings = processor.image_processor
    edge = settings.size.get("longest_edge") if isinstance(settings.size, dict) else None
    edge = edge or v.image_size
    probe = processor(text="<image>", images=[Image.new("RGB", (edge, edge), (127, 127, 127))],
                      add_special_tokens=False)
    frames = len(probe["pixel_values"][0])
    ids = list(probe["input_ids"][0])
    image_tokens = ids.count(config.image_token_id)
    split = "on" if settings.do_image_splitting else "off"
    return [
        f"model:       {folder}",
        f"vision:      SigLIP, {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.image_size} px tiles of "
        f"{patches} patches ({v.patch_size} px)",
        f"connector:   pixel shuffle x{config.scale_factor}, {config.image_seq_len} tokens per tile",
        f"text:        Llama, {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads "
        f"({t.num_key_value_heads} kv), vocab {t.vocab_size}, context {t.max_position_embeddings}",
        f"parameters:  {_human(total)} ({parts})" + (f", weights {config.torch_dtype}" if config.torch_dtype else ""),
        f"resolution:  longest edge {edge} px, splitting {split}",
        f"per image:   up to {frames} tile{'s' if frames != 1 else ''} x {config.image_seq_len} = {image_tokens} "
        f"image tokens "
        f"({len(ids)} prompt tokens with the tile markers)",
    ]


def parameter_counts(folder: Path, config: Any) -> dict[str, int]:
    """Parameters per part, read from the safetensors headers (no weights loaded)."""
    from math import prod

    from .weights import checkpoint_files, checkpoint_keys, read_headers

    shapes = {key: shape for key, (shape, _) in checkpoint_keys(read_headers(checkpoint_files(folder))).items()}
    return _count_parts({key: prod(shape) for key, shape in shapes.items()}, config)


def _count_parts(sizes: dict[str, int], config: Any) -> dict[str, int]:
    """Parameters per part from stored tensor sizes: a quantised matrix counts its weights (two per int4
    byte, padding aside), not its scales."""
    modules = (config.extra.get("quantization_config") or {}).get("modules", {})
    counts = {"vision": 0, "connector": 0, "text": 0, "lm_head": 0}
    for key, n in sizes.items():
        module, _, leaf = key.rpartition(".")
        if module in modules and leaf in ("scales", "mins"):
            continue
        if module in modules and leaf == "qweight" and modules[module].get("bits") == 4:
            n *= 2
        part = ("vision" if "vision_model" in key else "connector" if "connector" in key
                else "lm_head" if key.startswith("lm_head") else "text")
        counts[part] += n
    return counts


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
