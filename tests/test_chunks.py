"""A batch run reads plain JSON Lines as lists of payloads (transforms.chunks): every line exactly
once, however the file is split into ranges, before or while it is read (Dataflow rebalances
work by splitting a range being read), and the same payloads as Beam's own text reader gave."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.io import source_test_utils
from apache_beam.io.textio import ReadFromText
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import example, given, settings
from hypothesis import strategies as st

import transforms.chunks as chunks
from transforms.chunks import CHUNK, GatherChunks, LineChunkSource
from transforms.files import line_payload


def beams_own_payloads(path: str) -> list:
    """What Beam's text reader gives for the file, as payloads (what the pipeline read before)."""
    source = ReadFromText(path, coder=beam.coders.BytesCoder())._source
    lines = source_test_utils.read_from_source(source)
    return [payload for payload in map(line_payload, lines) if payload is not None]


def one_file(source: LineChunkSource):
    """The source of its one file, whose positions are byte offsets (the whole source's are
    (file, offset) pairs)."""
    [bundle] = list(source.split(desired_bundle_size=1 << 30))
    return bundle.source


def read_range(source: LineChunkSource, start: int, stop: int) -> list:
    chunks = source_test_utils.read_from_source(one_file(source), start, stop)
    return [payload for chunk in chunks for payload in chunk]


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(chunks, "_BLOCK", 7)  # lines longer than a block, newlines at its edges


CONTENT = (
    b'{"a": 1}\n'
    b"\n"
    b'{"b": "\xff not UTF-8"}\r\n'
    b"   \n"
    b'{"c": "' + b"x" * 40 + b'"}\r\r\n'
    b'{"d": 4}\n'
    b'{"e": "last, without a newline"}'
)


def test_every_range_split_reads_each_line_once_as_beams_text_reader_did(tmp_path, small_blocks):
    path = tmp_path / "events.jsonl"
    path.write_bytes(CONTENT)
    expected = beams_own_payloads(str(path))
    assert len(expected) == 5 and expected[1] == b'{"b": "\xff not UTF-8"}'
    source = LineChunkSource(str(path), chunk=2)
    assert read_range(source, 0, len(CONTENT)) == expected
    for cut in range(len(CONTENT) + 1):
        assert read_range(source, 0, cut) + read_range(source, cut, len(CONTENT)) == expected, cut
    assert all(len(chunk) <= 2 for chunk in source_test_utils.read_from_source(source))


def test_a_range_split_while_it_is_read_loses_and_repeats_nothing(tmp_path, small_blocks):
    path = tmp_path / "events.jsonl"
    path.write_bytes(CONTENT)
    # One payload a chunk, so that each record the utilities compare is one line.
    source_test_utils.assert_split_at_fraction_exhaustive(one_file(LineChunkSource(str(path), chunk=1)))


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(
        st.one_of(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), st.sampled_from([b"", b"\r", b" "])),
        max_size=12,
    ),
    final_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4),
)
@example(lines=[b"a", b"b"], final_newline=False, cuts=[1, 2, 3])
def test_any_file_cut_anywhere_reads_as_a_whole(tmp_path_factory, lines, final_newline, cuts):
    content = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path_factory.mktemp("cut") / "events.jsonl"
    path.write_bytes(content)
    expected = [p for p in (line_payload(line) for line in content.split(b"\n")) if p is not None]
    source = LineChunkSource(str(path), chunk=3)
    bounds = sorted({0, len(content), *(min(c, len(content)) for c in cuts)})
    read = []
    for start, stop in zip(bounds, bounds[1:]):
        read += read_range(source, start, stop)
    assert read == expected


def test_a_large_file_is_split_into_ranges_that_together_read_it_all(tmp_path):
    lines = [b'{"n": %d, "pad": "%s"}' % (i, b"p" * (i % 50)) for i in range(5000)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = LineChunkSource(str(path))
    bundles = list(source.split(desired_bundle_size=20_000))
    assert len(bundles) > 5
    read = [
        source_test_utils.read_from_source(bundle.source, bundle.start_position, bundle.stop_position)
        for bundle in bundles
    ]
    assert [payload for chunks in read for chunk in chunks for payload in chunk] == lines
    whole = source_test_utils.read_from_source(one_file(source))
    assert [len(chunk) for chunk in whole] == [CHUNK] * (len(lines) // CHUNK)


def test_gathered_chunks_hold_every_payload_once_and_no_more_than_a_chunk(tmp_path):
    payloads = [f"payload {i}" for i in range(2 * CHUNK + 17)]
    with BeamTestPipeline() as p:
        gathered = p | beam.Create(payloads) | beam.ParDo(GatherChunks())
        assert_that(gathered | "Each" >> beam.FlatMap(lambda chunk: chunk), equal_to(payloads), label="each")
        assert_that(
            gathered | "TooLarge" >> beam.Filter(lambda chunk: not 0 < len(chunk) <= CHUNK), equal_to([]), label="sizes"
        )
