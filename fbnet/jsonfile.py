"""JSON and YAML files read so that a damaged one is named with the line at fault (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, error: type[Exception]):
    """The parsed contents of ``path``; ``error("<path> line N: invalid JSON: ...")`` if it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} line {exc.lineno}: invalid JSON: {exc.msg}") from None


def read_mapping(path: str | Path, error: type[Exception], what: str):
    """The parsed contents of a YAML (or, by suffix, JSON) file; ``error`` naming the file (and
    where the parser stopped) when it cannot be read or parsed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    if path.suffix == ".json":
        return read_json(path, error)
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
