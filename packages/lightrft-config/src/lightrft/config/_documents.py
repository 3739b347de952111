"""JSON and YAML documents: tell document text from a file path, parse safely, report what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ._errors import one_problem

__all__ = ["dump_json", "dump_yaml", "load_json", "load_yaml", "write_text"]

_SUFFIXES = {"json": (".json",), "yaml": (".yaml", ".yml")}


def dump_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def load_json(text_or_path: str | os.PathLike[str], *, owner: str) -> dict[str, Any]:
    text, source = _read(text_or_path, "json", owner=owner)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise one_problem(
            None, text_or_path, f"from_json: {source} is not valid JSON: {exc}", owner=owner
        ) from exc
    return _require_mapping(data, "from_json", source, owner=owner)


def load_yaml(text_or_path: str | os.PathLike[str], *, owner: str) -> dict[str, Any]:
    text, source = _read(text_or_path, "yaml", owner=owner)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise one_problem(
            None, text_or_path, f"from_yaml: {source} is not valid YAML: {reason}", owner=owner
        ) from exc
    if data is None:  # an empty document overrides nothing
        return {}
    return _require_mapping(data, "from_yaml", source, owner=owner)


def _read(text_or_path: str | os.PathLike[str], kind: str, *, owner: str) -> tuple[str, str]:
    """Return (document text, a description of where it came from)."""
    if isinstance(text_or_path, str) and not _looks_like_path(text_or_path, kind):
        return text_or_path, "the text"
    if not isinstance(text_or_path, (str, os.PathLike)):
        raise one_problem(
            None,
            text_or_path,
            f"from_{kind} expects document text or a path, got {type(text_or_path).__name__}",
            owner=owner,
        )
    path = Path(text_or_path)
    try:
        return path.read_text(encoding="utf-8"), f"file {str(path)!r}"
    except OSError as exc:
        raise one_problem(
            None, str(path), f"from_{kind}: cannot read file {str(path)!r}: {exc.strerror}", owner=owner
        ) from exc


def _looks_like_path(text: str, kind: str) -> bool:
    # Documents of a whole config span lines or start with "{"; a path is one line that names an
    # existing file or ends with the format's suffix (so a missing file is reported as missing).
    stripped = text.strip()
    if not stripped or "\n" in stripped or stripped.startswith("{"):
        return False
    return stripped.lower().endswith(_SUFFIXES[kind]) or os.path.isfile(stripped)


def _require_mapping(data: Any, method: str, source: str, *, owner: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        reason = f"{method}: {source} holds {type(data).__name__} {data!r:.60}, not a mapping of field names to values"
        raise one_problem(None, data, reason, owner=owner)
    bad_keys = [key for key in data if not isinstance(key, str)]
    if bad_keys:
        raise one_problem(
            None, bad_keys[0], f"{method}: {source} has a non-string key {bad_keys[0]!r}", owner=owner
        )
    return data
