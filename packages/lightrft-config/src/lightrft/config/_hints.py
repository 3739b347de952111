"""Read a pydantic field's type and constraints back as words ("an integer >= 0") and argparse kwargs."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic.fields import FieldInfo

__all__ = ["describe_valid", "is_optional", "literal_choices", "strip_optional"]


def is_optional(annotation: Any) -> bool:
    """True when None is an accepted value (`X | None`)."""
    return _is_union(annotation) and type(None) in typing.get_args(annotation)


def strip_optional(annotation: Any) -> Any:
    """`X | None` -> `X`; anything else unchanged."""
    if not _is_union(annotation):
        return annotation
    rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return rest[0] if len(rest) == 1 else annotation


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (optional or not), else None."""
    core = strip_optional(annotation)
    if typing.get_origin(core) is Literal:
        return typing.get_args(core)
    return None


def describe_valid(info: FieldInfo) -> str:
    """Say in words what a field accepts, from its annotation and its annotated-types constraints."""
    annotation = info.annotation
    choices = literal_choices(annotation)
    if choices is not None:
        words = [repr(choice) for choice in choices]
        if is_optional(annotation):
            words.append("None")
        return _join_or(words)
    text = _describe_type(strip_optional(annotation))
    bounds = _describe_bounds(info.metadata)
    if bounds:
        text = f"{text} {bounds}"
    if is_optional(annotation):
        text += " or None"
    return text


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"a list of {_describe_type(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin is tuple:
        return f"a pair of {len(typing.get_args(annotation))} values"
    return getattr(annotation, "__name__", str(annotation))


def _describe_bounds(metadata: list[Any]) -> str:
    # Field(gt=..., le=...) stores annotated-types markers (Gt, Le, ...) in metadata; read them by
    # attribute so this module does not import annotated-types (a dependency of pydantic, not ours).
    words: list[str] = []
    for item in metadata:
        for attribute, symbol in _BOUNDS:
            bound = getattr(item, attribute, None)
            if bound is not None:
                words.append(f"{symbol} {bound:g}" if isinstance(bound, float) else f"{symbol} {bound}")
    return " and ".join(words)


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _join_or(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]
