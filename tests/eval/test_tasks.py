"""Each task's samples, prompts (both styles, and overrides) and scoring, on rows in the published layouts."""

from __future__ import annotations

import pytest

from eval.layouts import WRITERS
from idefics3.eval.benchmarks import get_tasks
from idefics3.eval.benchmarks.choice import mmstar_options
from idefics3.eval.benchmarks.mmmu import subject_of
from idefics3.eval.harness import Settings, list_samples
from idefics3.eval.prompts import parse_overrides, prompt_version, settings_for


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = {}
    for name, writer in WRITERS.items():
        folder = writer(tmp_path_factory.mktemp(name))
        (task,) = get_tasks(name)
        out[name] = (task, list_samples(task, Settings(data=str(folder)))[1])
    return out


def ask(samples, name, i=0, style="lmms-eval", overrides=None):
    task, rows = samples[name]
    return task.prompt(rows[i], settings_for(name, style, overrides))


def test_vqa_prompts(samples):
    assert ask(samples, "docvqa").text == ("What is written in box 0?\n"
                                           "Answer the question using a single word or phrase.")
    assert ask(samples, "textvqa").text.startswith("What number is shown 0?\n")  # .capitalize()d
    assert ask(samples, "chartqa", style="vlmevalkit").text == (
        "What is the value of bar 0?\nAnswer the question using a single word or phrase.\nGive a very brief answer.")
    assert ask(samples, "ocrbench").text == "what is written in the image 0?" and not ask(samples, "ocrbench").prefix


def test_choice_prompts(samples):
    assert ask(samples, "ai2d").text == ("Which label points to part 0?\nA. stem\nB. leaf\nC. root\nD. flower\n"
                                         "Answer with the option's letter from the given choices directly.")
    vlm = ask(samples, "ai2d", style="vlmevalkit")
    assert vlm.text.startswith("Question: Which label points to part 0?\nChoices:\nA. stem\n")
    assert vlm.text.endswith("D. flower\nAnswer with the letter.") and vlm.prefix == " Answer:"
    assert ask(samples, "mmstar").text.endswith("D: fish\nAnswer with the option's letter from the given choices "
                                                "directly")
    assert mmstar_options("Q?\nOptions: A: a, b, B: c., C: d, D: e") == ("Q?", ["a, b", "c.", "d", "e"])
    assert mmstar_options("no options here") == ("no options here", [])


def test_mmmu_samples_prompts_and_subjects(samples):
    task, rows = samples["mmmu"]
    assert [r.id for r in rows][:2] == ["validation_Art_Theory_1", "validation_Art_Theory_2"]
    assert len(rows) == 8  # both subjects' validation files; Math's dev split is not read
    assert len(rows[0].images) == 2 and len(rows[1].images) == 1  # the images the question names
    assert rows[0].categories == {"subject": "Art_Theory", "domain": "Art and Design",
                                  "question_type": "multiple-choice"}
    assert ask(samples, "mmmu", 1).text == ("Look at <image 1>. Which value fits question 2?\nA. 1 m/s\nB. 2 m/s\n"
                                            "C. 3 m/s\nD. 4 m/s\n\nAnswer with the option's letter from the given "
                                            "choices directly.")
    open_q = next(i for i, r in enumerate(rows) if r.fields["question_type"] == "open")
    assert ask(samples, "mmmu", open_q).text.endswith("\n\nAnswer the question using a single word or phrase.")
    vlm = ask(samples, "mmmu", 0, style="vlmevalkit")
    assert vlm.text.startswith("Question: <image 1>:<image>\n<image 2>:<image>\nLook at <image 1>.")
    assert vlm.prefix == " Answer:" and ask(samples, "mmmu", open_q, style="vlmevalkit").prefix == ""
    assert subject_of("validation_Art_Theory_12") == "Art_Theory" and subject_of("odd") == "unknown"


def test_mathvista_prompts(samples):
    assert ask(samples, "mathvista", 0).text == ("What fraction is blue in figure 1?\nA. 3/11\nB. 8/11\nC. 6/11\n"
                                                 "D. 3/5\nAnswer with the option's letter from the given choices "
                                                 "directly.")
    assert ask(samples, "mathvista", 1).text.endswith("picture 2?\nAnswer the question using a single integer "
                                                      "number.")
    vlm = ask(samples, "mathvista", 0, style="vlmevalkit")
    assert "Hint: " not in vlm.text and "\nA. 3/11\n" in vlm.text and vlm.text.endswith("\nAnswer with the letter.")
    assert vlm.prefix == " Answer:" and ask(samples, "mathvista", 1, style="vlmevalkit").prefix == ""


def test_overrides_and_versions():
    overrides = parse_overrides(["post=\\nBe brief.", "docvqa.pre=Q: ", "mmmu.prefix= Answer:"], ["docvqa", "mmmu"])
    assert settings_for("docvqa", "lmms-eval", overrides).post == "\nBe brief."
    assert settings_for("docvqa", "lmms-eval", overrides).pre == "Q: "
    assert settings_for("textvqa", "lmms-eval", overrides).pre == ""
    assert prompt_version("lmms-eval") == "lmms-eval/v1"
    assert prompt_version("lmms-eval", overrides).startswith("lmms-eval/v1+custom-")
    for bad, message in [("post", "expected KEY=VALUE"), ("colour=red", "unknown key"),
                         ("ocrbench.post=x", "not one of the tasks run")]:
        with pytest.raises(ValueError, match=message):
            parse_overrides([bad], ["docvqa"])
    with pytest.raises(ValueError, match="unknown prompt style"):
        settings_for("docvqa", "mine")


def test_scoring_through_the_tasks(samples):
    task, rows = samples["docvqa"]
    assert task.score("answer 0", rows[0]).score == 1.0
    task, rows = samples["textvqa"]
    assert task.score("0", rows[0]).score == pytest.approx(1.0) and task.score("zero", rows[0]).score > 0.9
    task, rows = samples["mmmu"]
    assert task.score("(B)", rows[0]).score == 1.0 and task.score("(B)", rows[0]).parsed == "B"
    task, rows = samples["mathvista"]
    got = task.score("B", rows[0])
    assert got.score == 1.0 and got.flags == {"fallback": True, "unparsed": False}
    assert task.score("8/11", rows[0]).flags == {"fallback": False, "unparsed": False}
    task, rows = samples["ai2d"]
    assert task.score("A.", rows[0]).score == 1.0 and task.score("stem", rows[0]).extra == {"vlmevalkit_rules": 1.0}
    task, rows = samples["mmstar"]
    assert task.score("A", rows[0]).score == 1.0
    task, rows = samples["chartqa"]
    assert task.score("10.4", rows[1]).score == 1.0
    task, rows = samples["ocrbench"]
    assert task.score("It says WORD0", rows[0]).score == 1.0


def test_unknown_tasks_are_named():
    with pytest.raises(ValueError, match=r"unknown task\(s\) vqav2 \(known: mmmu, mathvista"):
        get_tasks("docvqa,vqav2")
