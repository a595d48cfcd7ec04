"""The decide layer: walkerOS events in, Segment calls and decisions out, as plain data.

Its modules are compiled with Cython when the package is built (setup.py), and ``compiled.json``
beside them holds the digest of the source each was compiled from. A module whose source no
longer matches (a checkout edited since its last build) is loaded from that source instead, with
one warning, so an edit is never shadowed by a stale compiled module; ``make`` compiles again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import sys
import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent


class StaleCompiledModule(RuntimeWarning):
    """A compiled module is older than its source; the source runs."""


def _compiled_digests() -> dict[str, str]:
    try:
        return json.loads((_HERE / "compiled.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _stale_modules(digests: dict[str, str]) -> list[str]:
    """Modules with a compiled file beside their source that was not compiled from it."""
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for binary in _HERE.glob(f"*{suffix}"):
            name = binary.name[: -len(suffix)]
            source = _HERE / f"{name}.py"
            if source.exists() and digests.get(name) != hashlib.sha256(source.read_bytes()).hexdigest():
                stale.append(name)
    return sorted(set(stale))


class _FromSource:
    """Finds the named modules of this package as their source files (a meta path finder)."""

    def __init__(self, names: list[str]):
        self._names = {f"{__name__}.{name}" for name in names}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self._names:
            return None
        return importlib.util.spec_from_file_location(fullname, _HERE / f"{fullname.rpartition('.')[2]}.py")


def compiled_modules() -> dict[str, bool]:
    """Each module of this package, and whether it runs compiled: all of them after a build with
    Cython and a C compiler, none where it was installed as plain Python (or a source changed)."""
    out = {}
    for source in sorted(_HERE.glob("*.py")):
        if source.stem != "__init__":
            module = importlib.import_module(f"{__name__}.{source.stem}")
            out[source.stem] = isinstance(module.__loader__, importlib.machinery.ExtensionFileLoader)
    return out


def how_it_runs() -> str:
    """The layer in a word or two: "compiled", "plain Python", or "partly compiled" (sources
    edited since the last build). What `walkeros-segment --version` and the benchmark say."""
    compiled = compiled_modules().values()
    return "compiled" if all(compiled) else "plain Python" if not any(compiled) else "partly compiled"


def _run_stale_from_source() -> list[str]:
    """The stale modules, each set to load from its source, with one warning naming them."""
    digests = _compiled_digests()
    stale = _stale_modules(digests)
    if not stale:
        return stale
    sys.meta_path.insert(0, _FromSource(stale))
    what = (
        f"{', '.join(f'{name}.py' for name in stale)} changed since compiled"
        if digests
        else "compiled modules without the record of their source (compiled.json)"
    )
    warnings.warn(
        f"decide: {what}; running the source (slower) until the next build (make, or python setup.py "
        "build_ext --inplace)",
        StaleCompiledModule,
        stacklevel=3,
    )
    return stale


STALE = _run_stale_from_source()
