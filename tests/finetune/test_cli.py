"""`finetune` and `merge` report errors as the other `idefics3` commands do, whichever entry point runs them:
one `idefics3: error: ...` line and exit status 1; argparse usage errors exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from idefics3.cli import main

# The `idefics3` console script is idefics3.cli:main; `python -m idefics3.finetune` must behave the same.
ENTRY_POINTS = {"idefics3": [sys.executable, "-c", "import sys; from idefics3.cli import main; sys.exit(main())"],
                "python -m idefics3.finetune": [sys.executable, "-m", "idefics3.finetune"]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(entry: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY_POINTS[entry], *args], env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_errors_are_one_line_and_exit_1_usage_errors_exit_2(entry, tmp_path):
    missing = str(tmp_path / "missing")
    done = run(entry, "finetune", "--model", missing, "--data", missing, "--output", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == f"idefics3: error: model folder {missing!r} does not exist"
    assert "Traceback" not in done.stderr

    done = run(entry, "merge", "--model", missing, "--adapter", missing, "--output", str(tmp_path / "merged"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == f"idefics3: error: no adapter_config.json in the adapter folder {missing}"

    done = run(entry, "finetune", "--model", missing, "--data", missing)
    assert done.returncode == 2
    assert done.stderr.startswith("idefics3: error: the following arguments are required: --output")


def test_bad_options_and_an_occupied_output_folder_are_errors_of_the_cli(tmp_path, tiny_checkpoint, colour_task,
                                                                       capsys):
    base = ["finetune", "--model", str(tiny_checkpoint), "--data", str(colour_task[0]), "--output", str(tmp_path)]
    assert main(base + ["--warmup-ratio", "1.5"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "idefics3: error: warmup_ratio must be in [0, 1]"
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    assert main(base) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("idefics3: error: ") and "already holds checkpoints" in err and "--resume" in err
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--warmup", "5", "--warmup-ratio", "0.1"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
