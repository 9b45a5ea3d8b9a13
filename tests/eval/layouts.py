"""Tiny benchmark datasets written in each published Hub layout (file names, folders, columns, HF Image structs
{bytes, path}, several row groups and shards), for the end-to-end tests. Nothing is downloaded: the rows are
made up, the structure is the real one (tests/eval's README of layouts: src/idefics3/eval/layouts.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROW_GROUP = 3  # rows per row group: every split below has several


def picture(seed: int, size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    """A small picture that differs by seed (encoded bytes, as HF Image structs keep them)."""
    img = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 29) % 256))
    ImageDraw.Draw(img).rectangle([4 + seed % 20, 4, 30 + seed % 20, 30], fill=(255, 255, 255))
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def image_cell(data: bytes | None, path: str | None = None) -> dict[str, Any]:
    return {"bytes": data, "path": path}


def write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    """One parquet file with the `huggingface` schema metadata a Hub split carries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    features = {f.name: {"_type": "Image"} if f.type == IMAGE else {"_type": "Value"} for f in schema}
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=ROW_GROUP)
    return path


# ---- lmms-lab/DocVQA (config DocVQA; InfographicVQA beside it) ----------------------------------------------
DOCVQA = pa.schema([("questionId", pa.string()), ("question", pa.string()), ("question_types", pa.list_(pa.string())),
                    ("image", IMAGE), ("docId", pa.int64()), ("ucsf_document_id", pa.string()),
                    ("ucsf_document_page_no", pa.string()), ("answers", pa.list_(pa.string())),
                    ("data_split", pa.string())])


def docvqa(root: Path, n: int = 10, bad: int | None = None, long: int | None = None) -> Path:
    """`bad`: the row whose image is not an image; `long`: the row whose question outgrows any context."""
    rows = []
    for i in range(n):
        doc = i // 3  # three questions per page: the same image bytes
        question = "Why " * 3000 + "?" if i == long else f"What is written in box {i}?"
        rows.append({"questionId": str(1000 + i), "question": question,
                     "question_types": ["form"] if i % 2 else ["layout", "table/list"],
                     "image": image_cell(b"not an image" if i == bad else picture(doc)), "docId": doc,
                     "ucsf_document_id": f"doc{doc}", "ucsf_document_page_no": "1",
                     "answers": [f"answer {i}", f"Answer {i}."], "data_split": "validation"})
    half = n // 2
    write(root / "DocVQA" / "validation-00000-of-00002.parquet", rows[:half], DOCVQA)
    write(root / "DocVQA" / "validation-00001-of-00002.parquet", rows[half:], DOCVQA)
    test = [{**r, "questionId": str(9000 + i), "answers": None, "data_split": "test"} for i, r in enumerate(rows[:4])]
    write(root / "DocVQA" / "test-00000-of-00001.parquet", test, DOCVQA)
    write(root / "InfographicVQA" / "validation-00000-of-00001.parquet",
          [{**r, "questionId": "x" + r["questionId"]} for r in rows[:2]], DOCVQA)
    return root


# ---- lmms-lab/textvqa -------------------------------------------------------------------------------------------
TEXTVQA = pa.schema([("image_id", pa.string()), ("question_id", pa.int64()), ("question", pa.string()),
                     ("question_tokens", pa.list_(pa.string())), ("image", IMAGE), ("image_width", pa.int64()),
                     ("image_height", pa.int64()), ("flickr_original_url", pa.string()),
                     ("flickr_300k_url", pa.string()), ("answers", pa.list_(pa.string())),
                     ("image_classes", pa.list_(pa.string())), ("set_name", pa.string()),
                     ("ocr_tokens", pa.list_(pa.string()))])


def textvqa(root: Path, n: int = 7) -> Path:
    rows = [{"image_id": f"im{i}", "question_id": 34602 + i, "question": f"what number is shown {i}?",
             "question_tokens": ["what"], "image": image_cell(picture(i, fmt="JPEG")), "image_width": 96,
             "image_height": 64, "flickr_original_url": "", "flickr_300k_url": "",
             "answers": [str(i)] * 6 + ["none"] * 4, "image_classes": [], "set_name": "val", "ocr_tokens": []}
            for i in range(n)]
    write(root / "data" / "validation-00000-of-00001.parquet", rows, TEXTVQA)
    write(root / "data" / "test-00000-of-00001.parquet", [{**r, "answers": None} for r in rows[:3]], TEXTVQA)
    return root


# ---- MMMU/MMMU (one folder per subject config) -------------------------------------------------------------------
MMMU = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                  ("explanation", pa.string()), *[(f"image_{k}", IMAGE) for k in range(1, 8)],
                  ("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                  ("question_type", pa.string()), ("subfield", pa.string())])


def mmmu(root: Path) -> Path:
    def row(subject: str, i: int, split: str = "validation", open_: bool = False) -> dict[str, Any]:
        cells = {f"image_{k}": None for k in range(1, 8)}
        cells["image_1"] = image_cell(picture(i))
        question = f"Look at <image 1>. Which value fits question {i}?"
        if i % 2:
            cells["image_2"] = image_cell(picture(i + 50))
            question += " Compare with <image 2>."
        return {"id": f"{split}_{subject}_{i}", "question": question,
                "options": "[]" if open_ else "['1 m/s', '2 m/s', '3 m/s', '4 m/s']", "explanation": "",
                **cells, "img_type": "['Diagrams']", "answer": str(i) if open_ else "ABCD"[i % 4],
                "topic_difficulty": "Easy", "question_type": "open" if open_ else "multiple-choice",
                "subfield": "x"}
    write(root / "Art_Theory" / "validation-00000-of-00001.parquet", [row("Art_Theory", i) for i in range(1, 5)], MMMU)
    write(root / "Math" / "validation-00000-of-00001.parquet",
          [row("Math", i, open_=i == 3) for i in range(1, 5)], MMMU)
    write(root / "Math" / "dev-00000-of-00001.parquet", [row("Math", 9, "dev")], MMMU)
    return root


# ---- AI4Math/MathVista -----------------------------------------------------------------------------------------
MATHVISTA = pa.schema([("pid", pa.string()), ("question", pa.string()), ("image", pa.string()),
                       ("decoded_image", IMAGE), ("choices", pa.list_(pa.string())), ("unit", pa.string()),
                       ("precision", pa.float64()), ("answer", pa.string()), ("question_type", pa.string()),
                       ("answer_type", pa.string()),
                       ("metadata", pa.struct([("split", pa.string()), ("language", pa.string()),
                                               ("source", pa.string()), ("category", pa.string()),
                                               ("task", pa.string()), ("context", pa.string()),
                                               ("grade", pa.string()), ("skills", pa.list_(pa.string()))])),
                       ("query", pa.string())])


def mathvista(root: Path) -> Path:
    rows = []
    for i in range(1, 7):
        mc = i % 2 == 1
        meta = {"split": "testmini", "language": "english", "source": "x", "category": "math-targeted-vqa",
                "task": "figure question answering" if mc else "math word problem", "context": "x",
                "grade": "x", "skills": ["arithmetic reasoning"] + (["statistical reasoning"] if mc else [])}
        choices = ["3/11", "8/11", "6/11", "3/5"] if mc else None
        question = f"What fraction is blue in figure {i}?" if mc else f"How many apples are in picture {i}?"
        query = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
                 f"end.\nQuestion: {question}\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5") if mc else \
            f"Hint: Please answer the question requiring an integer answer.\nQuestion: {question}"
        rows.append({"pid": str(i), "question": question, "image": f"images/{i}.jpg",
                     "decoded_image": image_cell(picture(i)), "choices": choices, "unit": None,
                     "precision": None, "answer": "8/11" if mc else str(i), "question_type":
                     "multi_choice" if mc else "free_form", "answer_type": "text" if mc else "integer",
                     "metadata": meta, "query": query})
    write(root / "data" / "testmini-00000-of-00001-9f2b1c3d.parquet", rows, MATHVISTA)
    return root


# ---- Lin-Chen/MMStar (one file) ---------------------------------------------------------------------------------
MMSTAR = pa.schema([("index", pa.int64()), ("question", pa.string()), ("image", IMAGE), ("answer", pa.string()),
                    ("category", pa.string()), ("l2_category", pa.string()), ("meta_info", pa.string())])


def mmstar(root: Path) -> Path:
    cats = [("coarse perception", "image scene and topic"), ("math", "geometry"), ("math", "statistical reasoning")]
    rows = [{"index": i, "question": f"Which animal is shown {i}?\nOptions: A: cat, B: dog, C: bird, D: fish",
             "image": image_cell(picture(i)), "answer": "ABCD"[i % 4], "category": cats[i % 3][0],
             "l2_category": cats[i % 3][1], "meta_info": "{}"} for i in range(7)]
    write(root / "mmstar.parquet", rows, MMSTAR)
    return root


# ---- lmms-lab/ChartQA, lmms-lab/ai2d, echo840/OCRBench (data/<split>-*.parquet) ---------------------------------
CHARTQA = pa.schema([("type", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("image", IMAGE)])
AI2D = pa.schema([("question", pa.string()), ("options", pa.list_(pa.string())), ("answer", pa.string()),
                  ("image", IMAGE)])
OCRBENCH = pa.schema([("dataset", pa.string()), ("question", pa.string()), ("question_type", pa.string()),
                      ("answer", pa.list_(pa.string())), ("image", IMAGE)])


def chartqa(root: Path) -> Path:
    rows = [{"type": "human_test" if i % 2 else "augmented_test", "question": f"What is the value of bar {i}?",
             "answer": str(10 * i), "image": image_cell(picture(i))} for i in range(6)]
    write(root / "data" / "test-00000-of-00001.parquet", rows, CHARTQA)
    return root


def ai2d(root: Path) -> Path:
    rows = [{"question": f"Which label points to part {i}?", "options": ["stem", "leaf", "root", "flower"],
             "answer": str(i % 4), "image": image_cell(picture(i))} for i in range(5)]
    write(root / "data" / "test-00000-of-00001.parquet", rows, AI2D)
    return root


def ocrbench(root: Path) -> Path:
    types = ["Regular Text Recognition", "Doc-oriented VQA", "Handwritten Mathematical Expression Recognition"]
    rows = [{"dataset": "HME100k" if i % 3 == 2 else "IIIT5K", "question": f"what is written in the image {i}?",
             "question_type": types[i % 3], "answer": [f"word{i}"], "image": image_cell(picture(i))}
            for i in range(6)]
    write(root / "data" / "test-00000-of-00001.parquet", rows, OCRBENCH)
    return root


WRITERS = {"docvqa": docvqa, "textvqa": textvqa, "mmmu": mmmu, "mathvista": mathvista, "mmstar": mmstar,
           "chartqa": chartqa, "ai2d": ai2d, "ocrbench": ocrbench}
FOLDERS = {"docvqa": "DocVQA", "textvqa": "textvqa", "mmmu": "MMMU", "mathvista": "MathVista", "mmstar": "MMStar",
           "chartqa": "ChartQA", "ai2d": "ai2d", "ocrbench": "OCRBench"}


def data_root(root: Path) -> Path:
    """Every dataset under one root, in the folders `hf download` gives them (the --data-root layout)."""
    for name, writer in WRITERS.items():
        writer(root / FOLDERS[name])
    return root
