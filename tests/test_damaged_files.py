"""Files that cannot be read to their end (truncated, corrupt, not what their name says, or
inflating too far) are a failure of the run, reported with the file and how far it was read;
what was read before the damage is still processed. Lines and payloads that are not UTF-8 are
dead letters that keep their bytes, and a replay gives those very bytes back."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
from pathlib import Path

import fastavro
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import WRITE_KEY

import schemas
from pipeline.cli import main as cli_main
from transforms.files import DamagedFile, ReadLimits, iter_payloads, payloads_of_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FLOW = str(ROOT / "examples" / "flow.json")
SECTIONS = ("data", "context", "globals", "custom", "user", "nested", "consent", "source")


def events(n: int) -> list[dict]:
    return [
        {
            "name": "page view",
            "id": f"{i:016x}",
            "timestamp": 1767225600000 + i,
            "user": {"session": f"s{i}"},
            "data": {"id": f"/p{i}", "title": "x" * 200},
            "consent": {"analytics": True},
        }
        for i in range(n)
    ]


def jsonl(items) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in items)


def write_avro(path: Path, items) -> None:
    records = [{k: (json.dumps(v) if k in SECTIONS else v) for k, v in e.items()} for e in items]
    with open(path, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(schemas.load("event.avsc")), records, sync_interval=2000)


@pytest.fixture
def run(endpoint, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("SEGMENT_HOST", endpoint.url)

    def run(input_path, *flags):
        code = cli_main(
            [
                "run",
                "--flow",
                EXAMPLE_FLOW,
                "--input",
                str(input_path),
                "--dead_letter",
                str(tmp_path / "out" / "dead"),
                *flags,
            ]
        )
        return code, capsys.readouterr().out

    return run


def damaged_count(summary: str) -> int:
    [line] = [l for l in summary.splitlines() if "input files damaged" in l]
    return int(line.split()[3])


# -- non-UTF-8 ----------------------------------------------------------------------------------
BAD_LINE = b'{"name": "page view", "data": {"title": "caf\xe9"}, "user": {"session": "s"}}'


@pytest.mark.parametrize("dead_letter_format", ["jsonl", "avro"])
def test_a_line_that_is_not_utf8_is_one_not_json_dead_letter_keeping_its_bytes(
    run, endpoint, tmp_path, dead_letter_format
):
    good = events(2)
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps(good[0]) + b"\n" + BAD_LINE + b"\n" + orjson.dumps(good[1]) + b"\n")
    code, summary = run(path, "--dead_letter_format", dead_letter_format)
    assert code == 3  # one dead letter: the run finished and says so
    assert sorted(m["messageId"].split(":")[1] for m in endpoint.accepted if m["type"] == "page") == [
        e["id"] for e in good
    ]
    [dead_file] = (tmp_path / "out").glob("dead*")
    if dead_letter_format == "avro":
        with open(dead_file, "rb") as f:
            [record] = list(fastavro.reader(f))
    else:
        [record] = [json.loads(l) for l in dead_file.read_text().splitlines()]
    assert record["reason"] == "not_json" and record["payload_encoding"] == "base64"
    assert base64.b64decode(record["payload"]) == BAD_LINE
    # A replay reads the very bytes back, never a replacement character.
    assert list(iter_payloads(str(dead_file), "dead_letter")) == [BAD_LINE]


def _replay(run, dead_letter_file, tmp_path):
    """Replay one run's dead-letter file (moved out of the way first): the exit status, the
    summary and the records the replay dead-lettered again."""
    replay = tmp_path / "replay"
    replay.mkdir()
    code, summary = run(dead_letter_file.rename(replay / dead_letter_file.name), "--input_format", "dead_letter")
    [again] = (tmp_path / "out").glob("dead*")
    return code, summary, [json.loads(line) for line in again.read_text().splitlines()]


def test_a_replayed_non_utf8_dead_letter_fails_again_with_the_same_bytes(run, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(BAD_LINE + b"\n")
    run(path)
    [first] = (tmp_path / "out").glob("dead*")
    _, _, [record] = _replay(run, first, tmp_path)
    assert base64.b64decode(record["payload"]) == BAD_LINE and record["attempts"] == 2


# -- damaged files ------------------------------------------------------------------------------
def test_a_jsonl_gz_cut_in_half_is_a_damaged_file_and_its_first_half_is_delivered(run, endpoint, tmp_path, caplog):
    whole = gzip.compress(jsonl(events(400)))
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.ERROR):
        code, summary = run(path)
    assert damaged_count(summary) == 1
    assert code != 0
    delivered = len([m for m in endpoint.accepted if m["type"] == "page"])
    assert 0 < delivered < 400
    [line] = [r.getMessage() for r in caplog.records if "input file damaged" in r.getMessage()]
    assert str(path) in line and f"read {delivered} records" in line


@pytest.mark.parametrize(
    "name, content",
    [
        ("events.jsonl.gz", jsonl(events(3))),  # not gzip at all
        ("events.avro", jsonl(events(3))),  # not Avro at all
        ("events.json.gz", b"\x1f\x8b\x08\x00garbage"),  # a gzip header, then nothing valid
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_damaged(run, tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    code, summary = run(path)
    assert code != 0 and damaged_count(summary) == 1


def test_a_truncated_avro_file_gives_its_records_before_the_cut(tmp_path):
    path = tmp_path / "events.avro"
    write_avro(path, events(200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    damages = []
    payloads = list(payloads_of_file(str(path), "avro", on_damage=damages.append))
    [damage] = damages
    assert 0 < len(payloads) < 200 and damage.records == len(payloads)
    assert [p["id"] for p in payloads] == [e["id"] for e in events(len(payloads))]
    assert damage.path == str(path) and damage.bytes_read > 0


def test_the_damage_is_raised_when_nobody_takes_it(tmp_path):
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(DamagedFile, match="events.jsonl.gz"):
        list(payloads_of_file(str(path), "jsonl"))


def test_a_truncated_avro_dead_letter_file_in_a_replay_is_damaged(run, tmp_path):
    path = tmp_path / "events.jsonl"
    # Random text: deflate cannot shrink it into one Avro block, so half the file holds whole blocks.
    path.write_bytes(b"\n".join([b"not json " + os.urandom(100).hex().encode() for i in range(300)]) + b"\n")
    code, _ = run(path, "--dead_letter_format", "avro")
    [dead_file] = (tmp_path / "out").glob("dead*.avro")
    replay = tmp_path / "replay"
    replay.mkdir()
    data = dead_file.read_bytes()
    (replay / "dead.avro").write_bytes(data[: len(data) // 2])
    dead_file.unlink()
    code, summary = run(replay / "dead.avro", "--input_format", "dead_letter")
    assert code != 0 and damaged_count(summary) == 1
    assert "not_json" in summary  # what was read before the cut was replayed (and failed again)


def test_explain_reports_a_damaged_file_on_stderr_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    whole = gzip.compress(jsonl(events(400)))
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    assert cli_main(["explain", "--flow", EXAMPLE_FLOW, "--input", str(path)]) != 0
    captured = capsys.readouterr()
    read = len(captured.out.splitlines())
    assert 0 < read < 400
    assert str(path) in captured.err and f"read {read} records" in captured.err


# -- inflation ----------------------------------------------------------------------------------
def test_a_file_inflating_beyond_the_ratio_is_refused_before_it_is_read_whole(tmp_path):
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(b" " * 20_000_000 + b"\n"))  # one line, 20 MB of nothing
    damages = []
    limits = ReadLimits(max_inflation_ratio=100, inflation_floor_bytes=1_000_000)
    assert (
        list(payloads_of_file(str(path), "jsonl", limits=limits, size=path.stat().st_size, on_damage=damages.append))
        == []
    )
    [damage] = damages
    assert "refused" in damage.problem and "--max_inflation_ratio" in damage.problem
    assert damage.bytes_read < 2_000_000  # stopped early, not after reading it all


def test_max_inflated_mb_refuses_a_file_in_a_run(run, tmp_path):
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(events(1)) * 9000))  # about 3 MB inflated
    code, summary = run(path, "--max_inflated_mb", "1")
    assert code != 0 and damaged_count(summary) == 1


@settings(max_examples=150, deadline=None)
@example("avro", b"\x00" * 21)  # fastavro: KeyError('avro.schema') for a header without a schema
@example("avro", b"Obj\x01" + b"\x00" * 17)
@given(
    st.sampled_from(["jsonl.gz", "json.gz", "avro", "avro.gz", "dead_letter", "jsonl"]),
    st.one_of(
        st.binary(max_size=400),
        st.builds(lambda n, cut: gzip.compress(jsonl(events(n)))[:cut], st.integers(1, 20), st.integers(0, 3000)),
    ),
)
def test_any_bytes_in_any_file_give_payloads_or_a_damage_never_an_exception(kind, content):
    import tempfile

    suffix = {"dead_letter": ".jsonl"}.get(kind, "." + kind)
    fmt = {"jsonl.gz": "jsonl", "json.gz": "json", "avro.gz": "avro"}.get(kind, kind)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"input{suffix}"
        path.write_bytes(content)
        damages = []
        payloads = list(payloads_of_file(str(path), fmt, on_damage=damages.append))
    assert len(damages) <= 1
    if damages:
        assert damages[0].records == len(payloads) and str(path) in damages[0].line()


def test_a_glob_of_plain_and_compressed_files_reads_both_and_reports_the_damaged_one(run, endpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl(events(3)))
    whole = gzip.compress(jsonl(events(400)[3:]))
    (folder / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    code, summary = run(folder / "*", "--input_format", "jsonl")
    assert code != 0 and damaged_count(summary) == 1
    ids = {m["messageId"].split(":")[1] for m in endpoint.accepted if m["type"] == "page"}
    assert {e["id"] for e in events(3)} <= ids and len(ids) > 3


def test_a_truncated_dead_letter_is_never_replayed_as_if_whole(run, endpoint, tmp_path):
    path = tmp_path / "events.jsonl"
    # An invalid event far over the dead-letter limit: cut, its beginning is not the input it was.
    big = orjson.dumps({**events(1)[0], "name": "pageview", "data": {"blob": "y" * 9_000_000}})
    path.write_bytes(big + b"\n")
    run(path)
    [first] = (tmp_path / "out").glob("dead*")
    [record] = [json.loads(l) for l in first.read_text().splitlines()]
    assert record["payload_truncated_from"] == len(big) and big.decode().startswith(record["payload"])
    code, summary, [record2] = _replay(run, first, tmp_path)
    assert record2["reason"] == record["reason"] and record2["payload"] == record["payload"]
    assert record2["payload_truncated_from"] == len(big) and record2["attempts"] == 2
    assert "not replayable" in record2["error"] and not endpoint.accepted
