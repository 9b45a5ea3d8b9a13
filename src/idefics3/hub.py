"""Model references: a local checkpoint folder, or a Hugging Face Hub id.

A reference is resolved to a local folder once, here, so that every loader (config, weights, processor)
reads plain files. Hub ids go through huggingface_hub's own cache, so HF_HOME, HF_HUB_CACHE and
HF_HUB_OFFLINE behave exactly as users of the Hub libraries expect; nothing else is ever fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Only what a checkpoint folder needs; never pickled weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "README.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelNotFoundError(FileNotFoundError):
    """A model reference that names neither a local folder nor a reachable Hub repository."""


def resolve_model_path(ref: str | os.PathLike, revision: str | None = None) -> Path:
    """Return the local folder holding the checkpoint named by `ref` (a folder path or a Hub id)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model reference {str(ref)!r} is a file, not a checkpoint folder")
    text = str(ref)
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)
    if looks_local or not _REPO_ID.match(text):
        raise ModelNotFoundError(f"model folder {str(path.absolute())!r} does not exist")
    return _from_hub(text, revision)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    local = Path(repo_id)
    where = f"no local folder {str(local.absolute())!r}; Hub cache {HF_HUB_CACHE!r}"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS,
                                   local_files_only=bool(HF_HUB_OFFLINE))
    except Exception as err:  # huggingface_hub raises a zoo of types for "not there"
        mode = "offline (HF_HUB_OFFLINE=1)" if HF_HUB_OFFLINE else "online"
        raise ModelNotFoundError(
            f"model {repo_id!r} not found: {where}, {mode}: {type(err).__name__}: {err}".split("\n")[0]
        ) from err
    return Path(folder)
