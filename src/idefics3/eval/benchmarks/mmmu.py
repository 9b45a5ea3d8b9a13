"""MMMU (`MMMU/MMMU`, one folder per subject config; or `lmms-lab/MMMU`, all subjects in one folder).

Columns: id ("validation_Art_Theory_12"), question (naming its images "<image 1>"...), options (the text of a
Python list), answer (a letter, or free text for open questions), question_type ("multiple-choice" / "open"),
image_1 ... image_7. The images asked with a question are those its question and options name, in number order;
they go before the text and the "<image k>" names stay in it (lmms-eval's default, non-interleaved format).
Scores: micro accuracy with MMMU's official parsing (metrics/mmmu.py), broken down by subject, by the six
disciplines of MMMU's `DOMAIN_CAT2SUB_CAT` and by question type; the share of answers whose letter had to be
drawn at random is reported. A test split (answers hidden) writes {id: letter or answer}, the form of MMMU's
EvalAI submission.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..data import ImageRef
from ..metrics.mmmu import letters, multiple_choice_correct, open_correct, parse_multiple_choice, parse_open
from ..metrics.mmmu import parse_options as read_options
from ..prompts import PromptSettings
from ..task import Prompt, Sample, Scored, Task

DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
_DOMAIN_OF = {subject: domain for domain, subjects in DOMAINS.items() for subject in subjects}
_IMAGE_NAME = re.compile(r"<image (\d+)>")
MULTIPLE_CHOICE = "multiple-choice"


def subject_of(sample_id: str) -> str:
    """"validation_Art_Theory_12" -> "Art_Theory" (the subject, as lmms-eval's extract_subset_name reads it)."""
    split = sample_id.split("_")[0]
    found = re.match(rf"^{re.escape(split)}_(.+?)_\d+$", sample_id)
    return found.group(1) if found else "unknown"


class MMMU(Task):
    name, title, metric = "mmmu", "MMMU", "accuracy"
    hub = ("MMMU/MMMU", "lmms-lab/MMMU")
    columns = ("id", "question", "options", "answer", "question_type")
    optional = ("subfield", "topic_difficulty", "img_type")
    image_columns = tuple(f"image_{k}" for k in range(1, 8))
    breakdowns = ("subject", "domain", "question_type")
    max_new_tokens = 128

    def make_sample(self, row: dict[str, Any], images: dict[str, ImageRef], index: int, split: str) -> Sample:
        options = read_options(row["options"])
        text = row["question"] + " " + " ".join(options)
        numbers = sorted({int(k) for k in _IMAGE_NAME.findall(text) if 1 <= int(k) <= 7})
        subject = subject_of(str(row["id"]))
        answer = row["answer"]
        hidden = answer is None or str(answer).strip() in ("", "?")
        cats = {"subject": subject, "domain": _DOMAIN_OF.get(subject, "unknown"),
                "question_type": row["question_type"]}
        fields = {"question": row["question"], "options": options, "question_type": row["question_type"],
                  "images": numbers}
        return Sample(str(row["id"]), index, fields, [images[f"image_{k}"] for k in numbers],
                      None if hidden else answer, cats)

    def prompt(self, sample: Sample, settings: PromptSettings) -> Prompt:
        f = sample.fields
        multiple = f["question_type"] == MULTIPLE_CHOICE and f["options"]
        listed = "\n".join(f"{k}. {v}" for k, v in zip(letters(len(f["options"])), f["options"]))
        if settings.style == "vlmevalkit":
            named = "".join(f"<image {k}>:<image>\n" for k in f["images"])
            body = f"Question: {named}{f['question']}"
            if multiple:
                body += f"\nChoices:\n{listed}\n{settings.mc_post}"
            prefix = settings.prefix if multiple and len(f["options"]) >= 2 else ""
            return Prompt(settings.pre + body + settings.post, prefix)
        if multiple:
            return Prompt(f"{settings.pre}{f['question']}\n{listed}\n\n{settings.mc_post}{settings.post}",
                          settings.prefix)
        return Prompt(f"{settings.pre}{f['question']}\n\n{settings.open_post}{settings.post}", settings.prefix)

    def score(self, answer: str, sample: Sample) -> Scored:
        f = sample.fields
        if f["question_type"] == MULTIPLE_CHOICE and f["options"]:
            letter, drawn = parse_multiple_choice(answer, f["options"])
            correct = sample.references is not None and multiple_choice_correct(letter, sample.references)
            return Scored(None if sample.references is None else float(correct), letter, {"random": drawn})
        parsed = parse_open(answer)
        shown = sorted(parsed, key=lambda v: (isinstance(v, str), str(v)))
        if sample.references is None:
            return Scored(None, shown)
        return Scored(float(open_correct(parsed, sample.references)), shown)

    def submission(self, records: Sequence[dict[str, Any]]) -> Any:
        return {r["id"]: r["parsed"] if isinstance(r.get("parsed"), str) else r["answer"]
                for r in records if r.get("error") is None}
