"""Training checkpoints that survive a kill at any moment, and detection of damaged ones.

A checkpoint is a folder `checkpoints/step-00000042/` holding
    trainable.safetensors   the trainable parameters (LoRA weights, or everything trained in full mode)
    optimizer.pt            the optimizer state (torch.save, loaded with weights_only=True)
    state.json              step, each rank's data position and bad rows met, elapsed time, the run's settings
    rng.pt                  each rank's RNG states (torch CPU/CUDA, Python)
    manifest.json           size and SHA-256 of every file above, written last
It is written under a temporary name, every file fsynced, then renamed into place in one step, so a reader
sees either no checkpoint or a complete one. `latest_valid` walks checkpoints newest first, re-hashing each
file against the manifest, and returns the first intact one; a damaged one is logged and passed over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FILES = ("trainable.safetensors", "optimizer.pt", "state.json", "rng.pt")
MANIFEST = "manifest.json"
PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    def trainable(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "trainable.safetensors"), device=str(device))

    def optimizer(self) -> dict[str, Any]:
        return torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)

    def rng(self) -> list[dict[str, Any]]:
        return torch.load(self.path / "rng.pt", map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (restored by `set_rng_state`)."""
    import random

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    state: dict[str, Any], rng: list[dict[str, Any]], keep: int = 3) -> Path:
    """Write checkpoint `step` atomically under `folder`; keep the newest `keep` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
    manifest = {}
    for name in FILES:
        _fsync(tmp / name)
        manifest[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync(tmp / MANIFEST)
    if final.exists():  # a damaged checkpoint of the same step, from before a crash
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(folder)
    for old in all_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders, oldest first (leftover temporary folders are not checkpoints)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(path: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable manifest ({err})"
    for name in FILES:
        entry = manifest.get(name)
        file = path / name
        if entry is None or not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, expected {entry['size']}"
        if _sha256(file) != entry["sha256"]:
            return f"{name} fails its checksum"
    return None


def latest_valid(folder: Path) -> Checkpoint | None:
    """The newest intact checkpoint under `folder`, or None; damaged ones are logged and skipped."""
    for path in reversed(all_checkpoints(folder)):
        problem = verify(path)
        if problem is not None:
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path, problem)
            continue
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return Checkpoint(path, int(state["step"]), state)
    return None
