"""gradscope's one JSON convention, for every document it writes (recommend --json, compare.json).

Each document opens with ``"format"`` (what it is) and an integer ``"schema_version"`` (bumped when a
key changes meaning or goes away), and holds strict JSON only: NaN and infinities become null, since
standard parsers (jq, JavaScript) reject them, and paths become strings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def document(format_name: str, schema_version: int, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` under the format header, made strict-JSON safe."""
    return strict({"format": format_name, "schema_version": schema_version, **body})


def strict(value: Any) -> Any:
    """``value`` with NaN and inf as None and paths as strings, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return str(value) if isinstance(value, Path) else value
