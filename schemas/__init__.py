"""JSON Schemas and Avro schemas of the project, loadable from an installed wheel."""

import functools
import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@functools.cache
def load(name: str) -> dict:
    """The parsed schema file ``name`` (e.g. ``"flow.schema.json"``, ``"event.avsc"``)."""
    with open(_HERE / name, encoding="utf-8") as f:
        return json.load(f)
