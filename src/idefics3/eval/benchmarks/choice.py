"""The multiple-choice benchmarks with letter answers: AI2D and MMStar.

AI2D (`lmms-lab/ai2d`: question, options (list), answer (the index as a string), image) is scored as lmms-eval
scores it: exact match of the answer with the gold letter, ignoring case and punctuation. MMStar
(`Lin-Chen/MMStar`, one file `mmstar.parquet` = split val: index, question with the options written inside
"...\\nOptions: A: x, B: y, ...", answer (a letter), category, l2_category, image) is scored by MMStar's own rule
(choice.mmstar_hit); lmms-eval's l2-category average is reported beside it. Both also report VLMEvalKit's
rule-based matching (`vlmevalkit_rules`: can_infer, counted wrong where VLMEvalKit would ask its judge).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from statistics import mean
from typing import Any

from ..data import ImageRef
from ..metrics.choice import can_infer, exact_match, mmstar_hit
from ..metrics.mmmu import letters
from ..prompts import PromptSettings
from ..task import Prompt, Sample, Scored, Summary, Task

_MMSTAR_OPTIONS = re.compile(r"\n\s*Options:\s*(.*)\Z", re.S)
_MMSTAR_SPLIT = re.compile(r",\s*(?=[B-Z]\s*[:.]\s)")


def vlmevalkit_mcq(question: str, options: Sequence[str], instruction: str) -> str:
    """VLMEvalKit's multiple-choice text after IDEFICS2's rewrites ("Options" -> "Choices", the instruction)."""
    lines = [f"Question: {question}", "Choices:", *(f"{k}. {v}" for k, v in zip(letters(len(options)), options))]
    return "\n".join(lines) + f"\n{instruction}"


def mmstar_options(question: str) -> tuple[str, list[str]]:
    """(the stem, the option texts) of an MMStar question; ([question], []) when it has no readable options."""
    found = _MMSTAR_OPTIONS.search(question)
    if not found:
        return question, []
    parts = _MMSTAR_SPLIT.split(found.group(1).strip())
    options = []
    for i, part in enumerate(parts):
        head = re.match(rf"\s*{letters(len(parts))[i]}\s*[:.]\s*(.*)\Z", part, re.S)
        if not head:
            return question, []
        options.append(head.group(1).strip())
    return question[:found.start()].strip(), options


class AI2D(Task):
    name, title, metric = "ai2d", "AI2D", "accuracy"
    hub = ("lmms-lab/ai2d",)
    default_split = "test"
    columns = ("question", "options", "answer")
    max_new_tokens = 16

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        options = [str(o) for o in row["options"]]
        gold = None if row["answer"] in (None, "") else letters(len(options))[int(row["answer"])]
        return Sample(f"{split}-{index}", index, {"question": row["question"], "options": options}, [images["image"]],
                      gold)

    def prompt(self, sample: Sample, settings: PromptSettings) -> Prompt:
        question, options = sample.fields["question"], sample.fields["options"]
        if settings.style == "vlmevalkit":
            return Prompt(settings.pre + vlmevalkit_mcq(question, options, settings.mc_post) + settings.post,
                          settings.prefix)
        listed = "\n".join(f"{k}. {v}" for k, v in zip(letters(len(options)), options))
        return Prompt(f"{settings.pre}{question}\n{listed}{settings.post}", settings.prefix)

    def score(self, answer: str, sample: Sample) -> Scored:
        if sample.references is None:
            return Scored(None)
        choices = dict(zip(letters(len(sample.fields["options"])), sample.fields["options"]))
        inferred = can_infer(answer, choices)
        return Scored(float(exact_match(answer, sample.references)), inferred or None,
                      extra={"vlmevalkit_rules": float(inferred == sample.references)})


class MMStar(Task):
    name, title, metric = "mmstar", "MMStar", "accuracy"
    hub = ("Lin-Chen/MMStar",)
    default_split = "val"
    single_files = {"mmstar": "val"}
    columns = ("index", "question", "answer")
    optional = ("category", "l2_category")
    breakdowns = ("category", "l2_category")
    max_new_tokens = 32

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        cats = {"category": row.get("category"), "l2_category": row.get("l2_category")}
        return Sample(str(row["index"]), index, {"question": row["question"]}, [images["image"]],
                      row["answer"] or None, cats)

    def prompt(self, sample: Sample, settings: PromptSettings) -> Prompt:
        question = sample.fields["question"]
        if settings.style == "vlmevalkit":
            stem, options = mmstar_options(question)
            if options:
                return Prompt(settings.pre + vlmevalkit_mcq(stem, options, settings.mc_post) + settings.post,
                              settings.prefix)
            return Prompt(f"{settings.pre}Question: {question}\n{settings.mc_post}{settings.post}", settings.prefix)
        return Prompt(f"{settings.pre}{question}{settings.post}", settings.prefix)

    def score(self, answer: str, sample: Sample) -> Scored:
        if sample.references is None:
            return Scored(None)
        _, options = mmstar_options(sample.fields["question"])
        inferred = can_infer(answer, dict(zip(letters(len(options)), options))) if options else False
        return Scored(float(mmstar_hit(answer, sample.references)), inferred or None,
                      extra={"vlmevalkit_rules": float(inferred == sample.references)})

    def add_metrics(self, summary: Summary, scored: Sequence[dict[str, Any]]) -> None:
        l2 = summary.breakdown.get("l2_category", {})
        if l2:  # lmms-eval's figure: the mean over l2 categories (equal to the plain mean on the full set)
            summary.metrics["l2_average"] = mean(v["score"] for v in l2.values())
