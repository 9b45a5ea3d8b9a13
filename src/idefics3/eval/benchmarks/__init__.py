"""The benchmark table: every task `idefics3 eval --task` knows, by name.

    docvqa textvqa chartqa ocrbench   (vqa.py)      ai2d mmstar   (choice.py)
    mmmu                              (mmmu.py)     mathvista     (mathvista.py)

Other packages add tasks through `extra` arguments (the built-in demo adds `shapes`, its held-out check), so this
table stays free of any application's code.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..task import Task
from .choice import AI2D, MMStar
from .mathvista import MathVista
from .mmmu import MMMU
from .vqa import ChartQA, DocVQA, OCRBench, TextVQA

TASKS: dict[str, type[Task]] = {t.name: t for t in (MMMU, MathVista, MMStar, DocVQA, TextVQA, ChartQA, AI2D,
                                                    OCRBench)}


def get_tasks(names: str, extra: Mapping[str, Task] | None = None) -> list[Task]:
    """Tasks from a comma-separated list of names; ValueError naming the unknown ones and the known ones."""
    known: dict[str, Task] = {name: cls() for name, cls in TASKS.items()}
    known.update(extra or {})
    wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
    if not wanted:
        raise ValueError("--task names no task")
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return [known[n] for n in dict.fromkeys(wanted)]
