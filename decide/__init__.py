"""The decide layer: walkerOS events in, Segment calls and decisions out, as plain data.

Its modules are compiled with Cython when the package is built (setup.py), and ``compiled.json``
beside them holds the digest of the source each was compiled from: its ``.py`` and the ``.pxd``
beside it, which declares its hot classes as extension types. A module whose source no longer
matches (a checkout edited since its last build) is loaded from that source instead, with one
warning, so an edit is never shadowed by a stale compiled module; ``make`` compiles again. So are
the modules compiled against its declarations (their ``.pxd`` cimports it): a compiled module
checks at import that the types it was compiled against are the ones it finds.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent


class StaleCompiledModule(RuntimeWarning):
    """A compiled module is older than its source; the source runs."""


def _compiled_record() -> dict[str, Any]:
    """compiled.json: each module's source digest, and "profile-guided" (see setup.py)."""
    try:
        record = json.loads((_HERE / "compiled.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def source_digest(directory: Path, name: str) -> str:
    """What a compiled module was built from: its ``.py`` and, if there is one, its ``.pxd``.
    setup.py records the same digest when it compiles (it cannot import this package)."""
    digest = hashlib.sha256((directory / f"{name}.py").read_bytes())
    declarations = directory / f"{name}.pxd"
    if declarations.exists():
        digest.update(b"\0" + declarations.read_bytes())
    return digest.hexdigest()


_CIMPORT = re.compile(rf"^\s*from\s+{__name__}\.(\w+)\s+cimport\b", re.MULTILINE)


def _stale_modules(digests: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Modules with a compiled file beside their source that was not compiled from it, and
    those compiled against the declarations of one of them (which would fail to import)."""
    compiled = set()
    stale = set()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for binary in _HERE.glob(f"*{suffix}"):
            name = binary.name[: -len(suffix)]
            if (_HERE / f"{name}.py").exists():
                compiled.add(name)
                if digests.get(name) != source_digest(_HERE, name):
                    stale.add(name)
    cimports = {name: set(_CIMPORT.findall(_declarations(name))) for name in compiled}
    dependent: set[str] = set()
    while True:
        more = {name for name in compiled - stale - dependent if cimports[name] & (stale | dependent)}
        if not more:
            return sorted(stale), sorted(dependent)
        dependent |= more


def _declarations(name: str) -> str:
    try:
        return (_HERE / f"{name}.pxd").read_text(encoding="utf-8")
    except OSError:
        return ""


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


def profile_guided() -> bool:
    """Whether the compiled modules were built with the profile of decide.workload (setup.py)."""
    return _RECORD.get("profile-guided") is True and not STALE


def how_it_was_built() -> str:
    """:func:`how_it_runs`, and ", profile-guided" when it was: what --version and the benchmark say."""
    return how_it_runs() + (", profile-guided" if profile_guided() else "")


def _run_stale_from_source() -> list[str]:
    """The stale modules, each set to load from its source, with one warning naming them."""
    digests = _RECORD
    changed, dependent = _stale_modules(digests)
    stale = sorted(changed + dependent)
    if not stale:
        return stale
    sys.meta_path.insert(0, _FromSource(stale))
    if not digests:
        what = "compiled modules without the record of their source (compiled.json)"
    else:
        what = f"{', '.join(f'{name}.py' for name in changed)} changed since compiled"
        if dependent:
            what += f" (and {', '.join(dependent)} compiled against it)"
    warnings.warn(
        f"decide: {what}; running the source (slower) until the next build (make, or python setup.py "
        "build_ext --inplace)",
        StaleCompiledModule,
        stacklevel=3,
    )
    return stale


_RECORD = _compiled_record()
STALE = _run_stale_from_source()
