"""JSON files read so that a damaged one is named with the line at fault (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, error: type[Exception]):
    """The parsed contents of ``path``; ``error("<path> line N: invalid JSON: ...")`` if it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} line {exc.lineno}: invalid JSON: {exc.msg}") from None
