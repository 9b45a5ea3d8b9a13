"""The open-answer benchmarks: DocVQA (ANLS), TextVQA (VQA accuracy), ChartQA (relaxed accuracy), OCRBench.

Columns are those of the Hub layouts lmms-eval reads: `lmms-lab/DocVQA` (config DocVQA: questionId, question,
answers, image, ...), `lmms-lab/textvqa` (question_id, question, answers, image, ...), `lmms-lab/ChartQA` (type,
question, answer, image), `echo840/OCRBench` (dataset, question, question_type, answer, image). Test splits whose
answers are hidden (DocVQA's and TextVQA's) write the leaderboard's submission file instead of a score: DocVQA's
RRC takes [{"questionId": int, "answer": str}], TextVQA's EvalAI [{"question_id": int, "answer": str}] with the
answer already normalised, as lmms-eval writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data import ImageRef
from ..metrics.anls import anls
from ..metrics.chartqa import relaxed_correctness
from ..metrics.ocrbench import RECOGNITION, ocrbench_hit
from ..metrics.vqa import normalise_answer, vqa_accuracy
from ..prompts import PromptSettings
from ..task import Prompt, Sample, Scored, Summary, Task


def _answers(value: Any) -> list[str] | None:
    if value is None:
        return None
    answers = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return answers or None


class DocVQA(Task):
    name, title, metric = "docvqa", "DocVQA", "ANLS"
    hub = ("lmms-lab/DocVQA", "lmms-lab-encoder/DocVQA")
    config = "DocVQA"
    columns = ("questionId", "question")
    optional = ("answers", "question_types", "docId")
    breakdowns = ("question_types",)
    max_new_tokens = 32

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        return Sample(str(row["questionId"]), index, {"question": row["question"]}, [images["image"]],
                      _answers(row.get("answers")), {"question_types": row.get("question_types") or None})

    def score(self, answer: str, sample: Sample) -> Scored:
        if sample.references is None:
            return Scored(None)
        return Scored(anls(answer, sample.references))

    def submission(self, records: Sequence[dict[str, Any]]) -> Any:
        return [{"questionId": _int(r["id"]), "answer": r["answer"]} for r in records if r.get("error") is None]


class TextVQA(Task):
    name, title, metric = "textvqa", "TextVQA", "VQA accuracy"
    hub = ("lmms-lab/textvqa",)
    columns = ("question_id", "question")
    optional = ("answers", "image_id")
    max_new_tokens = 32

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        return Sample(str(row["question_id"]), index, {"question": row["question"]}, [images["image"]],
                      _answers(row.get("answers")))

    def prompt(self, sample: Sample, settings: PromptSettings) -> Prompt:
        return Prompt(f"{settings.pre}{sample.fields['question'].capitalize()}{settings.post}", settings.prefix)

    def score(self, answer: str, sample: Sample) -> Scored:
        if sample.references is None:
            return Scored(None, normalise_answer(answer))
        return Scored(vqa_accuracy(answer, sample.references), normalise_answer(answer))

    def submission(self, records: Sequence[dict[str, Any]]) -> Any:
        return [{"question_id": _int(r["id"]), "answer": normalise_answer(r["answer"])}
                for r in records if r.get("error") is None]


class ChartQA(Task):
    name, title, metric = "chartqa", "ChartQA", "relaxed accuracy"
    hub = ("lmms-lab/ChartQA",)
    default_split = "test"
    columns = ("question", "answer")
    optional = ("type",)
    breakdowns = ("type",)
    max_new_tokens = 16

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        return Sample(f"{split}-{index}", index, {"question": row["question"]}, [images["image"]],
                      None if row["answer"] is None else str(row["answer"]), {"type": row.get("type")})

    def score(self, answer: str, sample: Sample) -> Scored:
        if sample.references is None:
            return Scored(None)
        return Scored(float(relaxed_correctness(answer, sample.references)))


class OCRBench(Task):
    name, title, metric = "ocrbench", "OCRBench", "accuracy"
    hub = ("echo840/OCRBench",)
    default_split = "test"
    columns = ("dataset", "question", "question_type", "answer")
    breakdowns = ("question_type",)
    max_new_tokens = 128

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        return Sample(f"{split}-{index}", index, {"question": row["question"].strip(), "dataset": row["dataset"]},
                      [images["image"]], _answers(row["answer"]), {"question_type": row["question_type"]})

    def score(self, answer: str, sample: Sample) -> Scored:
        if sample.references is None:
            return Scored(None)
        return Scored(float(ocrbench_hit(answer, sample.references, sample.fields["dataset"])))

    def add_metrics(self, summary: Summary, scored: Sequence[dict[str, Any]]) -> None:
        hits = sum(r["score"] for r in scored)
        summary.metrics["final_score"] = hits  # OCRBench's "Final Score (Total 1000)" on the full set
        summary.metrics["recognition_score"] = sum(r["score"] for r in scored
                                                  if r.get("categories", {}).get("question_type") in RECOGNITION)


def _int(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value
