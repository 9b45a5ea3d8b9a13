"""Where a benchmark's parquet files are: a folder given with --data, a folder under --data-root, or the Hugging
Face cache (offline: nothing is ever downloaded here), and which of its files hold the asked split.

The files are found in the layouts the datasets are published in, as `hf download --repo-type dataset` (or
`datasets`' cache) writes them:

    DocVQA/validation-00000-of-00006.parquet       several shards per split, one folder per config
    data/validation-00000-of-00002-3f1a.parquet    one data/ folder (textvqa, ChartQA, ai2d, OCRBench, MathVista)
    Math/validation-00000-of-00001.parquet         one folder per subject config (MMMU)
    mmstar.parquet                                 one file, named after the dataset (a task maps it to a split)
    DocVQA/validation/0000.parquet                 the Hub's parquet conversion (refs/convert/parquet)

A split's files are every shard of that split, in name order (the dataset's order), and only those: other splits
and other configs beside them are never read. Hidden folders (.cache, .git) are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
_NUMBERED = re.compile(r"^\d+\.parquet$")


class DataError(ValueError):
    """Benchmark data that is missing or not in the layout its task expects."""


def split_of(path: Path, single_files: Mapping[str, str] | None = None) -> str:
    """The split a parquet file belongs to, from its name (or its folder's, for numbered files)."""
    if single_files and path.stem in single_files:
        return single_files[path.stem]
    shard = _SHARD.match(path.name)
    if shard:
        return shard.group("split")
    if _NUMBERED.match(path.name):
        return path.parent.name
    return path.stem


def parquet_files(folder: Path, config: str | None = None) -> list[Path]:
    """Every parquet file under `folder` (hidden folders skipped), restricted to the `config` subfolder when the
    folder holds one (matched without regard to case)."""
    if config is not None:
        sub = next((p for p in _children(folder) if p.name.lower() == config.lower()), None)
        if sub is not None:
            folder = sub
    found = []
    for path in sorted(folder.rglob("*.parquet")):
        relative = path.relative_to(folder).parts
        if not any(part.startswith(".") for part in relative):
            found.append(path)
    return found


def split_files(folder: Path, split: str, config: str | None = None,
                single_files: Mapping[str, str] | None = None) -> list[Path]:
    """The files of one split, in order; a DataError names the splits there are when it is not one of them."""
    if not folder.is_dir():
        raise DataError(f"no data folder {str(folder)!r}")
    files = parquet_files(folder, config)
    if not files:
        raise DataError(f"no parquet files under {str(folder)!r}")
    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(split_of(path, single_files), []).append(path)
    if split not in by_split:
        raise DataError(f"no split {split!r} under {str(folder)!r}; it has: {', '.join(sorted(by_split))}")
    return by_split[split]


def _children(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def hub_cache_folder(repo_id: str) -> Path | None:
    """The cached snapshot of a Hub dataset repository, or None; never downloads (HF_HOME / HF_HUB_CACHE apply)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not in the cache"
        return None


def locate(task_name: str, hub_repos: Iterable[str], data: str | Path | None = None,
           data_root: str | Path | None = None) -> Path:
    """The folder holding a task's files: --data, else a folder of --data-root named after the task or its Hub
    repository (any case), else the Hub cache."""
    repos = list(hub_repos)
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_dir():
            raise DataError(f"--data {str(path)!r} is not a folder")
        return path
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-root {str(root)!r} is not a folder")
        names = [task_name] + [r.split("/")[-1] for r in repos] + [r.replace("/", "--") for r in repos]
        wanted = {n.lower() for n in names}
        for child in _children(root):
            if child.name.lower() in wanted:
                return child
        for repo in repos:  # ROOT/org/name
            if (root / repo).is_dir():
                return root / repo
        raise DataError(f"--data-root {str(root)!r} has no folder for {task_name} (looked for: "
                        f"{', '.join(dict.fromkeys(names))})")
    for repo in repos:
        cached = hub_cache_folder(repo)
        if cached is not None:
            return cached
    hint = f"hf download {repos[0]} --repo-type dataset" if repos else "a folder of its parquet files"
    raise DataError(f"no data for {task_name}: pass --data FOLDER or --data-root ROOT, or put it in the Hugging Face "
                    f"cache ({hint})")
