"""Reading training data: JSONL with relative images, Cauldron-layout parquet, epoch order, and every bad-row case."""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from finetune.finetune_data import colour_image, colour_row, write_colour_task, write_jsonl
from idefics3.finetune.data import ParquetSource, epoch_order, open_source
from idefics3.finetune.encode import ConversationEncoder
from idefics3.finetune.stream import BadRowStats, DataError, ExampleStream


def png_bytes(colour: str, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    colour_image(colour, np.random.default_rng(seed)).save(buf, format="PNG")
    return buf.getvalue()


def write_cauldron(path, rows_per_group: int = 3, n: int = 7):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [[{"bytes": png_bytes("red", i), "path": None}] for i in range(n)]
    texts = [[{"user": f"Question {i}?", "assistant": f"Answer {i}.", "source": "synthetic"},
              {"user": "And?", "assistant": "Done.", "source": "synthetic"}] for i in range(n)]
    pq.write_table(pa.table({"images": images, "texts": texts}), path, row_group_size=rows_per_group)
    return path


def test_jsonl_rows_resolve_images_relative_to_the_file(tmp_path, processor):
    path = write_colour_task(tmp_path / "sub", 3)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes("blue")).decode()
    with open(path, "a") as f:
        f.write("\n" + json.dumps(colour_row(uri, "blue")) + "\n\n")
    source = open_source(path)
    assert len(source) == 4  # blank lines are not rows
    first = source.read(0)[0]["content"][0]["image"]
    assert first == str((tmp_path / "sub" / "images" / "train.jsonl-0.png").resolve())
    encoder = ConversationEncoder(processor)
    assert all(encoder(source.read(i)).pixel_values is not None for i in range(4))


def test_cauldron_parquet_is_read_one_row_group_at_a_time(tmp_path, processor):
    (tmp_path / "shards").mkdir()
    write_cauldron(tmp_path / "shards" / "a.parquet", n=7)
    write_cauldron(tmp_path / "shards" / "b.parquet", n=2)
    source = open_source(tmp_path / "shards")
    assert isinstance(source, ParquetSource) and len(source) == 9
    assert source.blocks() == [(0, 3), (3, 6), (6, 7), (7, 9)]
    messages = source.read(4)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"][0]["type"] == "image" and messages[0]["content"][1]["text"] == "Question 4?"
    assert messages[1]["content"][0]["text"] == "Answer 4." and len(messages[2]["content"]) == 1
    example = ConversationEncoder(processor)(messages)
    assert processor.tokenizer.decode([t for t in example.labels if t != -100]) == \
        " Answer 4.<end_of_utterance> Done.<end_of_utterance>"
    for epoch in range(3):  # each epoch a permutation; rows of a row group stay together
        order = epoch_order(source, epoch, seed=0).tolist()
        assert sorted(order) == list(range(9))
        groups = [next(i for i, (s, e) in enumerate(source.blocks()) if s <= r < e) for r in order]
        assert sum(a != b for a, b in zip(groups, groups[1:])) == 3
    assert epoch_order(source, 0, 0).tolist() != epoch_order(source, 1, 0).tolist()


def bad_rows_file(folder):
    """Two good rows and one row of every bad kind."""
    write_colour_task(folder, 2)
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    no_answer = {"messages": [good[0]["messages"][0]]}
    too_long = colour_row("images/train.jsonl-0.png", "red " * 400)
    rows = [good[0], colour_row("images/missing.png", "red"), colour_row("images/broken.png", "red"), no_answer,
            too_long, "{not json", {"text": "no messages"}, good[1]]
    return write_jsonl(folder / "bad.jsonl", rows)


EXPECTED_BAD = {"missing image": 1, "undecodable image": 1, "no assistant turn": 1, "too long": 1,
                "invalid json": 1, "bad format": 1}


def test_bad_rows_are_skipped_counted_and_the_first_reasons_logged(tmp_path, processor, caplog):
    source = open_source(bad_rows_file(tmp_path))
    stream = ExampleStream(source, ConversationEncoder(processor, max_length=300), seed=0, shuffle=False)
    with caplog.at_level(logging.WARNING):
        examples = [stream.next() for _ in range(3)]  # the third is the first row of the second epoch
    assert len(examples) == 3 and stream.position == 8 + 1
    assert dict(stream.stats.counts) == EXPECTED_BAD
    logged = [r.getMessage() for r in caplog.records if "skipping bad row" in r.getMessage()]
    assert len(logged) == 5 and "missing.png" in logged[0] and "further bad rows" in caplog.text
    strict = ExampleStream(source, ConversationEncoder(processor), seed=0, shuffle=False, strict=True)
    strict.next()
    with pytest.raises(DataError, match="missing image.*strict"):
        strict.next()


def test_a_bad_row_is_counted_once_over_epochs_ranks_and_a_resume(tmp_path, processor, caplog):
    source = open_source(bad_rows_file(tmp_path))  # rows 0 and 7 good, 1-6 bad
    encoder = ConversationEncoder(processor, max_length=300)
    stream = ExampleStream(source, encoder, seed=0, shuffle=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(6):  # three epochs: every bad row is met three times
            stream.next()
    assert stream.position == 24 and dict(stream.stats.counts) == EXPECTED_BAD and stream.stats.total == 6
    assert sum("skipping bad row" in r.getMessage() for r in caplog.records) == 5  # each logged once, up to 5
    assert stream.stats.summary().startswith("6 bad rows skipped (")

    # A checkpoint at position 3 holds the two bad rows met by then; a resumed stream counts the others once.
    state = stream.stats.until(3).state()
    assert state == {"rows": [[1, "missing image", 2], [2, "undecodable image", 3]], "unindexed": {}}
    resumed = BadRowStats()
    resumed.merge(json.loads(json.dumps(state)))  # as stored in state.json
    again = ExampleStream(source, encoder, seed=0, shuffle=False, position=3, stats=resumed)
    for _ in range(4):
        again.next()
    assert dict(again.stats.counts) == EXPECTED_BAD and again.stats.until(3).total == 2

    # Ranks that met the same row in different epochs report it once; an older checkpoint's plain counts add up.
    union = BadRowStats()
    for rank_state in ({"rows": [[1, "missing image", 2]]}, {"rows": [[1, "missing image", 9], [4, "too long", 5]]},
                       {"invalid json": 2}):
        union.merge(rank_state)
    assert dict(union.counts) == {"missing image": 1, "too long": 1, "invalid json": 2}
    assert BadRowStats(rows={}).summary() == "no bad rows" and "1 bad row skipped" in again.stats.until(2).summary()


def test_a_source_with_no_usable_row_fails_instead_of_spinning(tmp_path, processor):
    path = write_jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(DataError, match="no usable row"):
        ExampleStream(open_source(path), ConversationEncoder(processor), seed=0).next()


def test_cli_reports_bad_rows_and_strict_fails(tmp_path, tiny_checkpoint, capsys):
    from idefics3.finetune.__main__ import main

    data = bad_rows_file(tmp_path)
    base = [sys.executable, "-m", "idefics3.finetune", "finetune", "--model", str(tiny_checkpoint), "--data",
            str(data), "--max-steps", "1", "--batch-size", "2", "--no-split", "--max-length", "300",
            "--no-shuffle", "--lora-r", "2"]
    done = subprocess.run(base + ["--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipping bad row" in done.stderr and "missing image 1" in done.stderr and "too long 1" in done.stderr
    assert "no bad rows" not in (tmp_path / "out" / "README.md").read_text()
    assert main(base[3:] + ["--output", str(tmp_path / "strict"), "--strict"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("idefics3: error: bad row ") and "missing image" in err and "strict mode" in err
