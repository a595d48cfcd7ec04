"""The code's layers (docs/code-layout.md): imports point one way, run → move → talk to Segment →
decide, and nothing imports in a circle. Read from the source (every import, those inside
functions too), and checked once more by what a command really loads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("decide", "segment_api", "transforms", "pipeline", "local_segment")
# What each layer must not import: later layers, and for the inner ones Beam and the SDK.
FORBIDDEN = {
    "decide": ("apache_beam", "segment", "google", "segment_api", "transforms", "pipeline", "local_segment"),
    "segment_api": ("apache_beam", "google", "transforms", "pipeline", "local_segment"),
    "transforms": ("pipeline", "local_segment"),
    "local_segment": ("decide", "segment_api", "transforms", "pipeline"),
}
# Justified exceptions, each loaded only where it is needed.
ALLOWED = {
    # A worker whose write key is in Secret Manager reads it through Beam's GcpSecret, the one
    # client Beam already ships; imported inside that read, so deciding never loads Beam.
    ("decide/secrets.py", "apache_beam.utils.secret"),
}


def _modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            # `from transforms import files` imports the module transforms.files
            found.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists()
            )
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_comes_before_it(layer):
    wrong = []
    for path in _modules(layer):
        relative = path.relative_to(ROOT).as_posix()
        for name in _imports(path):
            if _top(name) in FORBIDDEN[layer] and (relative, name) not in ALLOWED:
                wrong.append(f"{relative} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_in_a_circle():
    graph: dict[str, set[str]] = {}
    for layer in PROJECT:
        for path in _modules(layer):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[module] = {name for name in _imports(path) if _top(name) in PROJECT}
    graph = {module: {name for name in names if name in graph and name != module} for module, names in graph.items()}
    cycles = [component for component in _strongly_connected(graph) if len(component) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _loaded_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {**os.environ, "SEGMENT_WRITE_KEY": "layers-test-key"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_deciding_loads_neither_beam_nor_the_sdk():
    modules = " ".join(f"import decide.{path.stem};" for path in _modules("decide") if path.stem != "__init__")
    loaded = _loaded_after(modules)
    assert not loaded & {"apache_beam", "segment"}


def test_validate_runs_without_loading_beam():
    """`validate` needs only the decide layer: it starts fast and works where Beam is not set up."""
    loaded = _loaded_after(
        "from pipeline.cli import main\nassert main(['validate', '--flow', 'examples/flow.json']) == 0"
    )
    assert "decide" in loaded and not loaded & {"apache_beam", "segment"}


def test_explain_decides_with_the_decide_layer_alone():
    """What `explain` prints comes from the decide layer only; reading its input (local or gs://)
    goes through the same file readers as the pipeline, imported when it reads."""
    tree = ast.parse((ROOT / "pipeline" / "explain.py").read_text())
    module_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            module_level.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            module_level.add(node.module)
    project = {name for name in module_level if _top(name) in PROJECT}
    assert project and all(_top(name) == "decide" for name in project), project
