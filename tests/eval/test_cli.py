"""`idefics3 eval` end to end on tiny datasets in every published layout, with the built-in demo model: files,
records, the table, submission files for hidden-answer splits, bad samples, resuming, and the errors for bad
input. (Kill-and-resume and torchrun run the command in child processes: test_processes.py.)"""

from __future__ import annotations

import json

import pytest

import idefics3
from eval.layouts import FOLDERS, WRITERS, data_root, docvqa, textvqa
from idefics3.cli import main

pytestmark = pytest.mark.skipif(not (idefics3.DEMO_MODEL / "config.json").is_file(), reason="no built-in model")
FAST = ["--dtype", "fp32", "--threads", "1", "--no-progress", "--max-new-tokens", "3"]


def run(capsys, *args):
    code = main(["eval", "--model", str(idefics3.DEMO_MODEL), *FAST, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_layout_end_to_end(tmp_path, capsys):
    root = data_root(tmp_path / "data")
    docvqa(root / FOLDERS["docvqa"], n=10, bad=4, long=7)  # one undecodable page, one question too long
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "--task", ",".join(WRITERS), "--data-root", str(root), "-o", str(out))
    assert code == 0, stderr
    for title in ("DocVQA", "TextVQA", "MMMU", "MathVista", "MMStar", "ChartQA", "AI2D", "OCRBench"):
        assert any(line.startswith(title + " ") for line in stdout.splitlines()), title
    expected = {"docvqa-validation": 10, "textvqa-validation": 7, "mmmu-validation": 8, "mathvista-testmini": 6,
                "mmstar-val": 7, "chartqa-test": 6, "ai2d-test": 5, "ocrbench-test": 6}
    for stem, n in expected.items():
        records = jsonl(out / f"{stem}.jsonl")
        assert len(records) == n and [r["index"] for r in records] == list(range(n)), stem
        assert all({"id", "prompt", "answer", "references", "score"} <= set(r) for r in records)
        result = json.loads((out / f"{stem}.json").read_text())
        assert result["samples"] == n and result["model"]["dtype"] == "float32"
        assert result["prompt"]["version"] == "lmms-eval/v1" and result["idefics3"]["version"]
        assert result["time"]["started"] and result["generation"]["max_new_tokens"] == 3
    assert not list(out.glob("*.part*.jsonl"))  # merged
    bad, long = jsonl(out / "docvqa-validation.jsonl")[4], jsonl(out / "docvqa-validation.jsonl")[7]
    assert bad["error"].startswith("image: cannot decode") and bad["score"] is None
    assert long["error"].startswith("prompt: the prompt has") and "max_seq_len" in long["error"]
    result = json.loads((out / "docvqa-validation.json").read_text())
    assert result["failed"] == 2 and result["errors"] == {"image": 1, "prompt": 1} and result["scored"] == 8
    assert "failed 2 (image 1, prompt 1)" in stdout
    mathvista = json.loads((out / "mathvista-testmini.json").read_text())
    assert {"fallback_share", "unparsed_share"} <= set(mathvista["metrics"])
    mmstar = json.loads((out / "mmstar-val.json").read_text())
    assert "l2_average" in mmstar["metrics"] and set(mmstar["breakdown"]) == {"category", "l2_category"}
    assert "random_share" in json.loads((out / "mmmu-validation.json").read_text())["metrics"]


def test_hidden_answers_write_the_submission_file(tmp_path, capsys):
    docvqa(tmp_path / "DocVQA")
    textvqa(tmp_path / "textvqa")
    out = tmp_path / "out"
    for task in ("docvqa", "textvqa"):
        code, stdout, stderr = run(capsys, "--task", task, "--data-root", str(tmp_path), "--split", "test",
                                   "-o", str(out))
        assert code == 0, stderr
        assert "submission" in stdout
    docs = json.loads((out / "docvqa-test-submission.json").read_text())
    assert [d["questionId"] for d in docs] == [9000, 9001, 9002, 9003] and all("answer" in d for d in docs)
    texts = json.loads((out / "textvqa-test-submission.json").read_text())
    assert [t["question_id"] for t in texts] == [34602, 34603, 34604]
    result = json.loads((out / "docvqa-test.json").read_text())
    assert result["score"] is None and result["submission"].endswith("docvqa-test-submission.json")


def test_resume_answers_only_the_rest_and_scores_like_one_run(tmp_path, capsys):
    data = docvqa(tmp_path / "DocVQA", n=10)
    common = ["--task", "docvqa", "--data", str(data)]
    assert run(capsys, *common, "-o", str(tmp_path / "full"))[0] == 0
    assert run(capsys, *common, "-o", str(tmp_path / "part"), "--limit", "4")[0] == 0
    code, _, stderr = run(capsys, *common, "-o", str(tmp_path / "part"))
    assert code == 1 and "pass --resume to continue it, or --overwrite" in stderr
    assert run(capsys, *common, "-o", str(tmp_path / "part"), "--resume")[0] == 0
    full = json.loads((tmp_path / "full" / "docvqa-validation.json").read_text())
    part = json.loads((tmp_path / "part" / "docvqa-validation.json").read_text())
    assert part["score"] == full["score"] and part["breakdown"] == full["breakdown"]
    assert part["time"]["samples_answered"] == 6  # only the six not done
    strip = [{k: r[k] for k in ("id", "answer", "score")} for r in jsonl(tmp_path / "full" / "docvqa-validation.jsonl")]
    assert [{k: r[k] for k in ("id", "answer", "score")}
            for r in jsonl(tmp_path / "part" / "docvqa-validation.jsonl")] == strip
    assert run(capsys, *common, "-o", str(tmp_path / "part"), "--overwrite", "--limit", "2")[0] == 0
    assert len(jsonl(tmp_path / "part" / "docvqa-validation.jsonl")) == 2


@pytest.mark.parametrize("args, message", [
    (["--task", "vqav2"], "unknown task(s) vqav2"),
    (["--task", "docvqa", "--limit", "0"], "--limit must be positive"),
    (["--task", "docvqa", "--batch", "-1"], "--batch must be positive"),
    (["--task", "docvqa,textvqa", "--data", "."], "--data names one task's folder"),
    (["--task", "docvqa", "--data", "/nonexistent/DocVQA"], "is not a folder"),
    (["--task", "docvqa", "--data-root", "/nonexistent"], "is not a folder"),
    (["--resume"], "--resume needs --output"),
    (["--task", "docvqa", "--prompt", "colour=red"], "unknown key 'colour'"),
])
def test_bad_input_is_one_clear_line(capsys, args, message):
    code, _, stderr = run(capsys, *args)
    assert code == 1 and stderr.startswith("idefics3: error:") and message in stderr, stderr
