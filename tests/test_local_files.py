"""Local runs match file patterns (the input, the dead-letter files) without walking the tree
below the pattern's directory: same matches as Beam's own matching, a fraction of the work."""

from __future__ import annotations

import json
import os

import pytest
from apache_beam.io.localfilesystem import LocalFileSystem
from support import flow_document

from pipeline import local_files


@pytest.fixture
def tree(tmp_path):
    """Dead letters and inputs beside a tree of other files, as in a working directory."""
    for name, size in [
        ("dl-run1-00000-of-00001.jsonl", 10),
        ("dl-run2-00000-of-00002.jsonl", 20),
        ("dl-run2-00001-of-00002.jsonl", 30),
        ("events.jsonl", 40),
        ("other.txt", 50),
    ]:
        (tmp_path / name).write_bytes(b"x" * size)
    for depth in range(3):
        sub = tmp_path / f"dl-sub{depth}" / "deeper"
        sub.mkdir(parents=True)
        (sub / "dl-run1-00000-of-00001.jsonl").write_bytes(b"y")
        (tmp_path / f"dl-sub{depth}" / "events.jsonl").write_bytes(b"z")
    os.symlink(tmp_path / "nowhere", tmp_path / "dl-broken-link")
    return tmp_path


PATTERNS = [
    "{d}/dl-*",
    "{d}/dl-run2-*-of-00002.jsonl",
    "{d}/*.jsonl",
    "{d}/dl-run?-*",
    "{d}/[eo]*",
    "{d}/nothing-*",
    "{d}/*/events.jsonl",  # a wildcard before a "/": Beam's own matching
    "{d}/**/dl-run1-*",  # "**": Beam's own matching
    "{d}/missing/dl-*",
    "{d}/events.jsonl",
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("limit", [None, 1])
def test_matches_what_beams_own_matching_matches(tree, pattern, limit):
    fs = LocalFileSystem(None)
    pattern = pattern.format(d=tree)
    [beams] = local_files._beams_match(fs, [pattern], [limit])
    [ours] = local_files._match(fs, [pattern], [limit])
    if limit is None:
        assert sorted(ours.metadata_list, key=str) == sorted(beams.metadata_list, key=str)
    else:
        assert len(ours.metadata_list) == len(beams.metadata_list)
        assert set(map(str, ours.metadata_list)) <= set(
            map(str, local_files._beams_match(fs, [pattern])[0].metadata_list)
        )
    assert ours.pattern == pattern


def test_a_pattern_with_wildcards_in_its_last_part_never_walks_the_tree(tree, monkeypatch):
    def no_walk(*args, **kwargs):
        raise AssertionError("walked the tree")

    monkeypatch.setattr(os, "walk", no_walk)
    [found] = local_files._match(LocalFileSystem(None), [f"{tree}/dl-run2-*-of-00002.jsonl"])
    assert sorted((os.path.basename(m.path), m.size_in_bytes) for m in found.metadata_list) == [
        ("dl-run2-00000-of-00002.jsonl", 20),
        ("dl-run2-00001-of-00002.jsonl", 30),
    ]


def test_a_local_run_matches_this_way_in_its_own_process(tmp_path, monkeypatch):
    from pipeline.cli import prepare_run

    monkeypatch.setattr(LocalFileSystem, "match", local_files._beams_match)
    events = tmp_path / "events.jsonl"
    events.write_text('{"name": "page view", "user": {"session": "s"}}\n')
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(flow_document()))
    prepared = prepare_run(["--flow", str(flow), "--input", str(events), "--dead_letter", str(tmp_path / "dl")])
    assert not isinstance(prepared, int)
    assert LocalFileSystem.match is local_files._match


def test_explain_matches_this_way_too(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main as cli_main

    monkeypatch.setattr(LocalFileSystem, "match", local_files._beams_match)
    (tmp_path / "part-1.jsonl").write_text('{"name": "page view", "id": "e1", "user": {"session": "s"}}\n')
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(flow_document()))
    assert cli_main(["explain", "--flow", str(flow), "--input", str(tmp_path / "part-*.jsonl")]) == 0
    assert '"e1"' in capsys.readouterr().out
    assert LocalFileSystem.match is local_files._match
