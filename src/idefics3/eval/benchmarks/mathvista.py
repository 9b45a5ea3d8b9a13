"""MathVista (`AI4Math/MathVista`, split testmini: 1,000 problems; test: 5,141 with hidden answers).

Columns: pid, question, decoded_image (the image; `image` is only its file name), choices (list or null), unit,
precision, answer (for multiple choice the option's *text*), question_type ("multi_choice" / "free_form"),
answer_type ("text" / "integer" / "float" / "list"), metadata {split, language, source, category, task, context,
grade, skills}, query (the dataset's ready-made prompt). The default prompt is lmms-eval's "format-prompt" (the
question, "A. choice" lines, and a hint by answer type); the vlmevalkit style rewrites `query` as VLMEvalKit's
IDEFICS2 class does. Scoring: metrics/mathvista.py, with the shares of answers that needed the rule fallback
(where the official pipeline asks GPT) and that no rule could read reported beside the score; broken down by
question type, answer type, task and skill. A test split writes {pid: {response, extraction, prediction}}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data import ImageRef
from ..metrics.mathvista import Problem, extract, is_correct, normalize_extracted_answer
from ..metrics.mmmu import letters
from ..prompts import PromptSettings
from ..task import Prompt, Sample, Scored, Task

HINTS = {
    "multi_choice": "Answer with the option's letter from the given choices directly.",
    "integer": "Answer the question using a single integer number.",
    ("float", 1): "Answer the question using a single floating-point number with one decimal place.",
    ("float", 2): "Answer the question using a single floating-point number with two decimal places.",
    "list": "Answer the question using a Python list.",
}
_VLMEVALKIT_REWRITES = [(f"({c}) ", f"{c}. ") for c in "ABCDEFGH"] + [("\nOptions:", "\nChoices:"), ("Hint: ", "")]


def _hint(problem: Problem) -> str:
    if problem.multiple_choice:
        return HINTS["multi_choice"]
    if problem.answer_type == "float":
        return HINTS.get(("float", problem.precision),
                         f"Answer the question using a single floating-point number with {problem.precision} "
                         "decimal places.")
    return HINTS.get(problem.answer_type, "")


class MathVista(Task):
    name, title, metric = "mathvista", "MathVista", "accuracy"
    hub = ("AI4Math/MathVista",)
    default_split = "testmini"
    columns = ("pid", "question", "question_type", "answer_type")
    optional = ("choices", "unit", "precision", "answer", "metadata", "query")
    image_columns = ("decoded_image",)
    breakdowns = ("question_type", "answer_type", "task", "skills")
    max_new_tokens = 1024

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        precision = row.get("precision")
        answer = row.get("answer")
        problem = Problem(row["question_type"], row["answer_type"], tuple(str(c) for c in row.get("choices") or ()),
                          int(precision) if precision not in (None, "") and precision == precision else 0,
                          None if answer in (None, "") else str(answer))
        meta = row.get("metadata") or {}
        fields = {"question": row["question"], "unit": row.get("unit") or "", "query": row.get("query") or "",
                  "problem": problem}
        cats = {"question_type": row["question_type"], "answer_type": row["answer_type"], "task": meta.get("task"),
                "skills": list(meta.get("skills") or []) or None}
        return Sample(str(row["pid"]), index, fields, [images["decoded_image"]], problem.answer, cats)

    def prompt(self, sample: Sample, settings: PromptSettings) -> Prompt:
        f, problem = sample.fields, sample.fields["problem"]
        if settings.style == "vlmevalkit" and f["query"]:
            text = f["query"].strip()
            for old, new in _VLMEVALKIT_REWRITES:
                text = text.replace(old, new)
            multiple = "A." in text and "B." in text
            if multiple:
                text += f"\n{settings.mc_post}"
            return Prompt(settings.pre + text + settings.post, settings.prefix if multiple else "")
        question = f["question"] + (f" (Unit: {f['unit']})" if f["unit"] else "")
        parts = [question]
        if problem.choices:
            parts.append("\n".join(f"{k}. {c}" for k, c in zip(letters(len(problem.choices)), problem.choices)))
        parts.append(_hint(problem))
        return Prompt(settings.pre + "\n".join(p for p in parts if p) + settings.post, settings.prefix)

    def score(self, answer: str, sample: Sample) -> Scored:
        problem: Problem = sample.fields["problem"]
        got = extract(answer, problem)
        prediction = normalize_extracted_answer(got.text, problem)
        flags = {"fallback": got.fallback, "unparsed": got.unparsed}
        parsed = {"extraction": got.text, "prediction": prediction}
        if sample.references is None:
            return Scored(None, parsed, flags)
        return Scored(float(is_correct(prediction, sample.references)), parsed, flags)

    def submission(self, records: Sequence[dict[str, Any]]) -> Any:
        return {r["id"]: {"response": r["answer"], **(r.get("parsed") or {})}
                for r in records if r.get("error") is None}
