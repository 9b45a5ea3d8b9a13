"""Finding and reading the published layouts: splits by file name, configs, single files, the Hub cache, row
groups, lazy images, and the errors for data that is missing or has the wrong columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from eval.layouts import DOCVQA, IMAGE, ROW_GROUP, docvqa, image_cell, mmstar, picture, write
from idefics3.eval.benchmarks import get_tasks
from idefics3.eval.data import ImageError, ImageRef, read_rows
from idefics3.eval.harness import Settings, list_samples
from idefics3.eval.layouts import DataError, locate, split_files, split_of


def test_split_names_of_the_published_file_names():
    assert split_of(Path("DocVQA/validation-00001-of-00006.parquet")) == "validation"
    assert split_of(Path("data/testmini-00000-of-00001-9f2b1c3d.parquet")) == "testmini"
    assert split_of(Path("DocVQA/validation/0000.parquet")) == "validation"   # the Hub's parquet conversion
    assert split_of(Path("mmstar.parquet"), {"mmstar": "val"}) == "val"
    assert split_of(Path("dev.parquet")) == "dev"


def test_a_split_is_all_its_shards_of_the_asked_config_only(tmp_path):
    docvqa(tmp_path)
    files = split_files(tmp_path, "validation", config="DocVQA")
    assert [f.name for f in files] == ["validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"]
    assert all(f.parent.name == "DocVQA" for f in files)  # InfographicVQA beside it is never read
    assert len(split_files(tmp_path / "DocVQA", "validation", config="DocVQA")) == 2  # the config folder itself
    with pytest.raises(DataError, match="no split 'train'.*it has: test, validation"):
        split_files(tmp_path, "train", config="DocVQA")
    (tmp_path / ".cache" / "x").mkdir(parents=True)
    write(tmp_path / ".cache" / "x" / "validation-00000-of-00001.parquet", [], DOCVQA)
    assert len(split_files(tmp_path, "validation", config="DocVQA")) == 2  # hidden folders skipped


def test_locate_by_flag_root_and_hub_cache(tmp_path, monkeypatch):
    root = tmp_path / "root"
    mmstar(root / "mmstar")
    assert locate("mmstar", ["Lin-Chen/MMStar"], data_root=root) == root / "mmstar"  # any case of a known name
    assert locate("mmstar", ["Lin-Chen/MMStar"], data=root / "mmstar") == root / "mmstar"
    with pytest.raises(DataError, match="--data-root .* has no folder for docvqa"):
        locate("docvqa", ["lmms-lab/DocVQA"], data_root=root)
    with pytest.raises(DataError, match="is not a folder"):
        locate("docvqa", ["lmms-lab/DocVQA"], data=tmp_path / "missing")
    # the Hugging Face cache, offline: datasets--org--name/snapshots/<rev> named by refs/main
    cache = tmp_path / "hub"
    snapshot = cache / "datasets--lmms-lab--DocVQA" / "snapshots" / "abc123"
    docvqa(snapshot)
    (cache / "datasets--lmms-lab--DocVQA" / "refs").mkdir()
    (cache / "datasets--lmms-lab--DocVQA" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    found = locate("docvqa", ["lmms-lab/DocVQA"])
    assert found.resolve() == snapshot.resolve()
    with pytest.raises(DataError, match="hf download AI4Math/MathVista --repo-type dataset"):
        locate("mathvista", ["AI4Math/MathVista"])


def test_rows_are_read_by_row_group_and_images_lazily(tmp_path):
    docvqa(tmp_path, n=10, bad=4)
    files = split_files(tmp_path, "validation", config="DocVQA")
    rows = list(read_rows(files, ["questionId", "question"], ["image"], "docvqa", "lmms-lab/DocVQA", ["answers"]))
    assert [r["questionId"] for r, _ in rows] == [str(1000 + i) for i in range(10)]
    assert "image" not in rows[0][0] and rows[0][0]["answers"] == ["answer 0", "Answer 0."]
    refs = [images["image"] for _, images in rows]
    assert {r.row_group for r in refs} == {0, 1} and max(r.row for r in refs) == ROW_GROUP - 1
    first, digest = refs[0].load()
    assert first.mode == "RGB" and first.size == (96, 64)
    assert refs[1].load()[1] == digest and refs[3].load()[1] != digest  # same page, same digest
    with pytest.raises(ImageError, match="cannot decode image of row"):
        refs[4].load()


def test_image_paths_relative_to_the_file_and_empty_cells(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(picture(1))
    schema = pa.schema([("q", pa.string()), ("image", IMAGE)])
    path = write(tmp_path / "test.parquet", [{"q": "a", "image": image_cell(None, "images/1.png")},
                                             {"q": "b", "image": image_cell(None, None)},
                                             {"q": "c", "image": image_cell(None, "images/missing.png")}], schema)
    assert ImageRef(path, 0, 0, "image").load()[0].size == (96, 64)
    with pytest.raises(ImageError, match="empty"):
        ImageRef(path, 0, 1, "image").load()
    with pytest.raises(ImageError, match="cannot read"):
        ImageRef(path, 0, 2, "image").load()


def test_a_parquet_without_the_expected_columns_is_named(tmp_path):
    schema = pa.schema([("question", pa.string()), ("image", IMAGE)])
    write(tmp_path / "DocVQA" / "validation-00000-of-00001.parquet", [{"question": "q", "image": None}], schema)
    (task,) = get_tasks("docvqa")
    with pytest.raises(DataError, match=r"has no column\(s\) questionId: docvqa reads questionId, question, image"):
        list_samples(task, Settings(data=str(tmp_path)))


def test_limit_keeps_the_first_samples_and_duplicate_ids_are_refused(tmp_path):
    docvqa(tmp_path, n=10)
    (task,) = get_tasks("docvqa")
    split, samples, files = list_samples(task, Settings(data=str(tmp_path), limit=4))
    assert split == "validation" and [s.id for s in samples] == ["1000", "1001", "1002", "1003"]
    write(tmp_path / "DocVQA" / "validation-00001-of-00002.parquet",
          [{"questionId": "1000", "question": "again", "question_types": [], "image": None, "docId": 0,
            "ucsf_document_id": "", "ucsf_document_page_no": "", "answers": ["a"], "data_split": "validation"}],
          DOCVQA)
    with pytest.raises(DataError, match="'1000' appears twice"):
        list_samples(task, Settings(data=str(tmp_path)))
