"""Loading and saving checkpoints: safetensors only, strict, with no random initialisation.

The model's parameter names equal the checkpoint keys, so loading is a direct mapping: build the model
on the meta device (no memory, no init), read each tensor from the single file or the shards named by
model.safetensors.index.json, convert it to the requested dtype and device, and assign it. Nothing is
ever unpickled. Any mismatch (missing or unexpected keys, a wrong shape, a damaged file) is an error
that names what is wrong, never a silently half-initialised model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError, Idefics3Config
from .device import runnable_dtype
from .dtypes import NAMES, to_torch_dtype
from .hub import resolve_model_path

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that travel with the weights and are copied as they are by save_pretrained.
_COMPANIONS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json")


class WeightsError(ValueError):
    """A checkpoint whose weights cannot be loaded into the model as they are."""


def parse_dtype(dtype: torch.dtype | str | None, config: Idefics3Config) -> torch.dtype:
    """A torch dtype from a dtype, a name ("bf16", "bfloat16", "torch.float16") or "auto"/None (the checkpoint's)."""
    if dtype is None or dtype == "auto":
        name = str(config.torch_dtype or "float32").removeprefix("torch.")
        return to_torch_dtype(name) if name in NAMES else torch.float32
    return to_torch_dtype(dtype)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards of the index, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise WeightsError(f"{index} is not a valid safetensors index: {err}") from err
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index.name} names shard(s) that are not in {folder}: {', '.join(missing)}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled:
        raise WeightsError(f"{folder} has only pickled weights ({', '.join(sorted(pickled))}); idefics3 loads "
                           f"safetensors only and never unpickles. Convert the checkpoint to safetensors first.")
    raise WeightsError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), validated against its size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (None,)
            if n is None or n > size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, struct.error) as err:
        raise WeightsError(f"cannot read {path}: the file is truncated or corrupt ({err})") from err
    header.pop("__metadata__", None)
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if end > size:
        raise WeightsError(f"cannot read {path}: the file is truncated or corrupt (its header describes "
                           f"{end} bytes, the file has {size})")
    for name, t in header.items():
        if t.get("dtype") not in _ST_DTYPES:
            raise WeightsError(f"cannot read {path}: tensor {name} has unsupported dtype {t.get('dtype')!r}")
    return {name: {**t, "base": 8 + n} for name, t in header.items()}


def iter_tensors(files: list[Path], headers: dict[Path, dict[str, dict]] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (key, tensor) of the files, as zero-copy views of a private memory map of each file.

    Nothing is read until used, and the weights stay file-backed (one copy, shared with the page
    cache); a dtype or device conversion makes the only copy. Writes copy-on-write, never to the file.
    """
    for path in files:
        header = headers[path] if headers is not None else read_header(path)
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)  # [file bytes]
        for key, t in header.items():
            begin, end = (t["base"] + o for o in t["data_offsets"])
            dtype = _ST_DTYPES[t["dtype"]]
            chunk = raw[begin:end]
            if begin % dtype.itemsize:  # unaligned in the file: copy once instead of viewing
                chunk = chunk.clone()
            yield key, chunk.view(dtype).reshape(t["shape"])


def read_headers(files: list[Path]) -> dict[Path, dict[str, dict]]:
    """The tensor table of every file, read once and shared by the key check and the loader."""
    return {path: read_header(path) for path in files}


def checkpoint_keys(headers: dict[Path, dict[str, dict]]) -> dict[str, tuple[list[int], Path]]:
    """key -> (shape, file) from the safetensors headers only."""
    return {key: (list(t["shape"]), path) for path, header in headers.items() for key, t in header.items()}


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Skip parameter initialisation while building on the meta device (the file provides every value)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "ones_", "zeros_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


_EMBED, _HEAD = "model.text_model.embed_tokens.", "lm_head."


@dataclass
class LoadHooks:
    """How a feature that changes the model's modules (quantisation) takes part in loading, without this
    module knowing it: `prepare` changes the model built on the meta device before the key check; `found`
    maps the checkpoint's keys and shapes to those the prepared model will receive; `convert` takes a tensor
    as read from the file (before any dtype conversion) and returns the tensors it becomes, or None to leave
    it to the plain path (converted to the dtype and device); `finish` runs on the loaded model."""

    prepare: Callable[[torch.nn.Module], None] | None = None
    found: Callable[[dict[str, tuple[list[int], Path]]], dict[str, tuple[list[int], Path]]] | None = None
    convert: Callable[[str, torch.Tensor, torch.device], dict[str, torch.Tensor] | None] | None = None
    finish: Callable[[torch.nn.Module, torch.dtype], None] | None = None


def _check_keys(model: torch.nn.Module, found: dict[str, tuple[list[int], Path]], tied: bool) -> None:
    expected = {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if tied:  # the head is the embedding, under whatever names it stores its tensors
        expected = {k: v for k, v in expected.items() if not k.startswith(_HEAD)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not (tied and k.startswith(_HEAD)))
    problems = []
    if missing:
        more = " ..." if len(missing) > 20 else ""
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{more}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                        f"{' ...' if len(unexpected) > 20 else ''}")
    if problems:
        raise WeightsError("checkpoint does not match the model: " + "; ".join(problems))
    for key, shape in expected.items():
        if found[key][0] != shape:
            raise WeightsError(f"shape mismatch for {key}: checkpoint has {found[key][0]} "
                               f"({found[key][1].name}), the model expects {shape}")


def load_pretrained(cls: type, ref: str | os.PathLike, dtype: torch.dtype | str | None,
                    device: torch.device | str | None, revision: str | None = None,
                    hooks: Callable[[Idefics3Config], LoadHooks | None] | None = None):
    """Build `cls` on the meta device from the folder's config and fill it from its safetensors. `hooks`
    (given the config) lets a feature such as quantisation change the modules while loading (LoadHooks)."""
    folder = resolve_model_path(ref, revision)
    config = Idefics3Config.from_pretrained(folder)
    target = parse_dtype(dtype, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None or dtype == "auto":  # the checkpoint's dtype, unless this CPU cannot compute in it
        target = runnable_dtype(target, device)
    files = checkpoint_files(folder)
    headers = read_headers(files)
    found = checkpoint_keys(headers)
    with no_init():
        model = cls(config)
    hook = (hooks(config) if hooks is not None else None) or LoadHooks()
    if hook.prepare is not None:
        hook.prepare(model)
    tied = config.tie_word_embeddings
    _check_keys(model, hook.found(found) if hook.found is not None else found, tied)
    state = {}
    for key, tensor in iter_tensors(files, headers):
        if tied and key.startswith(_HEAD):
            continue
        converted = hook.convert(key, tensor, device) if hook.convert is not None else None
        if converted is None:
            converted = {key: tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)}
        state.update(converted)
    if tied:
        state.update({_HEAD + k[len(_EMBED):]: v for k, v in list(state.items()) if k.startswith(_EMBED)})
    model.load_state_dict(state, strict=True, assign=True)
    if tied and isinstance(getattr(model.lm_head, "weight", None), torch.nn.Parameter):
        model.lm_head.weight = model.model.text_model.embed_tokens.weight
    if hook.finish is not None:
        hook.finish(model, target)
    model.config.torch_dtype = str(target).removeprefix("torch.")
    model.checkpoint_dir = folder
    model.name_or_path = str(ref)
    log.info("loaded %s (%d tensors, %s, %s)", ref, len(state), target, device)
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, mult in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def save_pretrained(model, folder: str | os.PathLike, max_shard_size: int | str | None = None) -> None:
    """Write config.json and safetensors (one file, or shards + index when over max_shard_size)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD)}
    model.config.torch_dtype = str(model.dtype).removeprefix("torch.")
    model.config.save_pretrained(folder)
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], folder / SINGLE_FILE)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            _atomic_save(shard, folder / name)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    source = model.checkpoint_dir
    if source is not None and Path(source).resolve() != folder.resolve():
        for name in _COMPANIONS:
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, folder / name)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["WeightsError", "ConfigError", "LoadHooks", "load_pretrained", "save_pretrained", "parse_dtype"]
