"""The decide layer runs compiled (setup.py compiles it with Cython): every module of it, its
answers the same as its plain Python source's, and an edited source is never shadowed by a
compiled module built from an older one."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import decide
import decide.event

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p.stem for p in (ROOT / "decide").glob("*.py") if p.stem != "__init__")
HOSTILE_LINES = [
    b'{"name": "page view", "timestamp": 1e300, "id": "far"}',  # a time out of range
    b'{"name": "page view", "data": {"title": "\xff\xfe"}}',  # not UTF-8
    b'{"name": "page view", "data": ' + b'{"a": ' * 80 + b"1" + b"}" * 80 + b"}",  # too deep
    b"not json",
    b'[{"name": "page view", "id": "a"}, 3, {"name": "nospace"}]',  # an envelope, partly bad
    b'{"name": "page view", "id": "", "consent": {"analytics": "yes"}}',
]


def test_every_module_of_the_decide_layer_runs_compiled():
    """What `make` builds and the tests run is what users run; a build that fell back to plain
    Python (no compiler, no Cython) must not pass unnoticed."""
    assert decide.STALE == []
    assert decide.compiled_modules() == dict.fromkeys(SOURCES, True)
    assert isinstance(decide.event.__loader__, importlib.machinery.ExtensionFileLoader)
    assert decide.profile_guided()  # built as users build it: trained on decide.workload, then compiled


def test_the_compiled_layer_answers_as_its_source(tmp_path):
    """explain over the benchmark's flow (17 rules, JavaScript functions, identify and group,
    consent, loops) and 2,000 of its events plus hostile lines: byte for byte the same output
    from the compiled modules and from their plain source."""
    from bench.generate import write_events, write_flow

    flow = write_flow(tmp_path / "flow.json", flush_at=500)
    events = tmp_path / "events.jsonl"
    write_events(events, 2000)
    with events.open("ab") as f:
        f.write(b"\n".join(HOSTILE_LINES) + b"\n")

    plain = tmp_path / "plain"
    shutil.copytree(ROOT / "decide", plain / "decide", ignore=shutil.ignore_patterns("*.so", "*.c", "compiled.json"))
    outputs = {}
    for name, path in (("compiled", ROOT), ("plain", plain)):
        outputs[name] = _explain(flow, events, pythonpath=[path, ROOT])
    assert outputs["plain"][1] == ["plain Python"]  # the copy really ran its source
    assert outputs["compiled"][1] == ["compiled"]
    assert outputs["compiled"][0] == outputs["plain"][0]
    assert outputs["compiled"][0].count(b"\n") == 2000 + len(HOSTILE_LINES) + 2  # an envelope: 3 lines


def _explain(flow: Path, events: Path, pythonpath: list[Path]) -> tuple[bytes, list[str]]:
    script = (
        "import sys, decide; from pipeline.cli import main; "
        "print(decide.how_it_runs(), file=sys.stderr); "
        f"sys.exit(main(['explain', '--flow', {str(flow)!r}, '--input', {str(events)!r}, "
        "'--max_dead_letter_ratio', '1']))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, cwd=flow.parent, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    kinds = [
        line for line in done.stderr.decode().splitlines() if line in ("compiled", "plain Python", "partly compiled")
    ]
    return done.stdout, kinds


def test_an_edited_source_runs_instead_of_its_stale_compiled_module(tmp_path):
    """A checkout edited since `make` last compiled it: the edited module runs from its source,
    with one warning naming it, and the others stay compiled."""
    _edited_copy(tmp_path, "event.py", "\n\ndef edited():\n    return 'the edit runs'\n")
    script = (
        "import decide.event, decide.calls; "
        "print(decide.event.edited(), [n for n, c in decide.compiled_modules().items() if not c])"
    )
    done = _python_in(tmp_path, script)
    assert done.stdout.strip() == "the edit runs ['event']"  # no other module cimports event
    assert "decide: event.py changed since compiled; running the source" in _stale_warning(done)


def _edited_copy(tmp_path: Path, name: str, addition: str) -> None:
    """A copy of the compiled package in ``tmp_path`` with ``addition`` appended to one file."""
    shutil.copytree(ROOT / "decide", tmp_path / "decide")
    edited = tmp_path / "decide" / name
    edited.write_text(edited.read_text() + addition)


def _stale_warning(done: subprocess.CompletedProcess) -> str:
    [warning] = [line for line in done.stderr.splitlines() if "StaleCompiledModule" in line]
    return warning


def test_modules_compiled_against_an_edited_one_run_from_source_too(tmp_path):
    """calls and destination are compiled against mapping's extension types (their .pxd
    cimports it): once mapping.py is edited, they run from source with it, and the warning says
    why, instead of failing to import against the changed types."""
    _edited_copy(tmp_path, "mapping.py", "\n\nEDITED = True\n")
    script = (
        f"import sys; sys.path.append({str(ROOT / 'tests')!r}); "
        "import decide, decide.mapping; from decide.destination import Destination; "
        "from decide.event import normalise; from support import flow_document, make_spec; "
        "spec = make_spec(flow_document(mapping={'page': {'view': {'name': 'Viewed'}}})); "
        "event = normalise({'name': 'page view', 'id': 'e1', 'timestamp': 1, 'user': {'id': 'u'}}); "
        "outcome = Destination(spec).process(event, {}); "
        "print(decide.mapping.EDITED, [m['event'] for m in outcome.calls], "
        "[n for n, c in decide.compiled_modules().items() if not c])"
    )
    done = _python_in(tmp_path, script)
    assert done.stdout.strip() == "True ['Viewed'] ['calls', 'destination', 'mapping']"
    assert "mapping.py changed since compiled (and calls, destination compiled against it)" in _stale_warning(done)


def test_an_edited_declaration_file_makes_its_module_stale(tmp_path):
    """The .pxd is part of a module's source: an edit to it alone is noticed too."""
    _edited_copy(tmp_path, "identity.pxd", "\n# edited\n")
    done = _python_in(tmp_path, "import decide; print(decide.STALE)")
    assert done.stdout.strip() == "['calls', 'destination', 'identity']"


@pytest.mark.parametrize("record", ["missing", "unreadable"])
def test_compiled_modules_without_their_record_are_not_trusted(tmp_path, record):
    """Compiled modules whose build did not finish (no compiled.json, or a damaged one) could be
    from any source: each runs from its source instead."""
    shutil.copytree(ROOT / "decide", tmp_path / "decide")
    if record == "missing":
        (tmp_path / "decide" / "compiled.json").unlink()
    else:
        (tmp_path / "decide" / "compiled.json").write_text("{not json")
    done = _python_in(
        tmp_path, f"import decide; print(decide.STALE == {SOURCES!r}, any(decide.compiled_modules().values()))"
    )
    assert done.stdout.strip() == "True False"
    assert "compiled modules without the record of their source (compiled.json); running the source" in done.stderr


def _python_in(copy: Path, script: str) -> subprocess.CompletedProcess:
    """``script`` run with the copy of the package in ``copy`` first on the path."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=copy,
        env={**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{ROOT}"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_the_version_says_how_the_decide_layer_runs(capsys):
    from pipeline.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip().endswith("(decide layer: compiled, profile-guided)")


@pytest.mark.parametrize(
    "without, why",
    [
        ("cython", "Cython is not installed"),
        ("compiler", "compiling failed"),
        ("asked", None),
    ],
)
def test_a_build_that_cannot_compile_installs_plain_python_and_says_so(tmp_path, without, why):
    """No Cython, no working C compiler, or WALKEROS_SEGMENT_PURE_PYTHON=1: the build still
    succeeds, leaves no compiled module or record behind, says why in one line, and the package
    runs its plain source."""
    shutil.copytree(ROOT / "decide", tmp_path / "decide", ignore=shutil.ignore_patterns("*.so", "*.c", "compiled.json"))
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    env = {k: v for k, v in os.environ.items() if k != "WALKEROS_SEGMENT_PURE_PYTHON"}
    if without == "cython":  # an importable name that fails as a missing package does
        (tmp_path / "no_cython" / "Cython").mkdir(parents=True)
        (tmp_path / "no_cython" / "Cython" / "__init__.py").write_text("raise ImportError('no Cython here')\n")
        env["PYTHONPATH"] = str(tmp_path / "no_cython")
    elif without == "compiler":
        env["CC"] = "false"
    else:
        env["WALKEROS_SEGMENT_PURE_PYTHON"] = "1"
    done = _build_in(tmp_path, env)
    assert not list((tmp_path / "decide").glob("*.so")) and not (tmp_path / "decide" / "compiled.json").exists()
    lines = _build_lines(done)
    if why is None:
        assert lines == []
    else:
        [line] = lines
        assert why in line and line.endswith("the decide layer installs as plain Python (slower)")
    ran = _python_in(tmp_path, "import decide; print(any(decide.compiled_modules().values()), decide.STALE)")
    assert ran.stdout.strip() == "False []"


def test_a_build_whose_training_cannot_run_compiles_without_a_profile_and_says_so(tmp_path):
    """Where decide.workload cannot run (as in pip's isolated build environment, which holds
    none of its dependencies; here orjson fails to import), the modules are compiled again
    without the instrumentation and without a profile, and one line says so. (A copy with one
    module, to keep the two compiles short.)"""
    (tmp_path / "decide").mkdir()
    for name in ("__init__.py", "consent.py", "consent.pxd"):
        shutil.copy(ROOT / "decide" / name, tmp_path / "decide" / name)
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    (tmp_path / "no_orjson" / "orjson").mkdir(parents=True)
    (tmp_path / "no_orjson" / "orjson" / "__init__.py").write_text("raise ImportError('no orjson here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALKEROS_SEGMENT_")}
    env["PYTHONPATH"] = str(tmp_path / "no_orjson")
    done = _build_in(tmp_path, env)
    [line] = _build_lines(done)
    assert line == (
        "walkeros-segment: the training workload failed (ImportError: no orjson here); "
        "compiling without profile-guided optimisation"
    )
    ran = _python_in(
        tmp_path, "import decide, decide.consent; print(decide.compiled_modules(), decide.profile_guided())"
    )
    assert ran.stdout.strip() == "{'consent': True} False"
    assert not list(tmp_path.rglob("*.gcda"))  # no instrumentation left to write profiles


def test_the_training_workload_takes_every_path_an_event_takes():
    """What the compiler learns from: events delivered (batch and streaming steps), denied by
    consent, ignored and dead-lettered, every kind of call, then cut into requests."""
    from decide.workload import run

    tally = run(2000)
    assert tally["delivered"] > 1500 and tally["batches"] > 0
    assert tally["consent_denied"] > 0 and tally["ignored"] > 0 and tally["dead_letter"] == 1
    assert all(tally[call] > 0 for call in ("identify", "group", "page", "track"))


def _build_in(copy: Path, env: dict) -> subprocess.CompletedProcess:
    """`setup.py build_ext --inplace` in ``copy``, which must succeed whatever it cannot do."""
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        capture_output=True,
        text=True,
        cwd=copy,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _build_lines(done: subprocess.CompletedProcess) -> list[str]:
    """What the build said to the user."""
    return [line for line in done.stderr.splitlines() if line.startswith("walkeros-segment: ")]
