"""Populate an argparse parser with one option per config field, so the CLI and the model agree."""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic.fields import FieldInfo

from ._hints import literal_choices, strip_optional

__all__ = ["ParserT", "add_field_arguments"]

ParserT = TypeVar("ParserT", bound="argparse.ArgumentParser | argparse._ArgumentGroup")


def add_field_arguments(
    parser: ParserT,
    fields: Mapping[str, FieldInfo],
    *,
    prefix: str,
    unset_defaults: Mapping[str, str],
    group_title: str,
) -> ParserT:
    """Add `<prefix><name>` for every field that the parser does not already define.

    A field named in `unset_defaults` gets `default=None` (read back as "not given", so the model
    resolves it) and the mapped text as its documented default.
    """
    # Options and dests the script already defined win: many training scripts declare some of
    # these flags themselves, and argparse would refuse a second definition.
    taken_options = parser._option_string_actions
    taken_dests = {action.dest for action in parser._actions}
    # A titled group keeps these options together in --help; groups share the parser's option table.
    target = parser.add_argument_group(group_title) if isinstance(parser, argparse.ArgumentParser) else parser
    for name, info in fields.items():
        option = f"{prefix}{name}"
        if option in taken_options or name in taken_dests:
            continue
        kwargs = _argument_kwargs(info)
        described_default = "%(default)s"
        if name in unset_defaults:
            kwargs["default"] = None
            described_default = unset_defaults[name]
        action = target.add_argument(option, dest=name, **kwargs)
        # BooleanOptionalAction appends its own "(default: ...)" on some Python versions.
        if action.help is not None and "(default:" not in action.help:
            action.help += f" (default: {described_default})"
    return parser


def _argument_kwargs(info: FieldInfo) -> dict[str, Any]:
    annotation = strip_optional(info.annotation)
    origin = typing.get_origin(annotation)
    default = info.get_default(call_default_factory=True)
    kwargs: dict[str, Any] = {"default": default, "help": _help_text(info)}
    choices = literal_choices(info.annotation)
    if choices is not None:
        kwargs.update(choices=list(choices), type=type(choices[0]))
    elif annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is tuple:
        items = typing.get_args(annotation)
        kwargs.update(
            nargs=len(items), type=_scalar_type(items[0]), metavar=tuple(f"V{i}" for i in range(len(items)))
        )
    elif origin is list:
        (item,) = typing.get_args(annotation)
        kwargs.update(nargs="*", type=_scalar_type(item), metavar="NAME")
    elif origin is dict:
        kwargs.update(type=_json_object, metavar="JSON")
    else:
        kwargs["type"] = _scalar_type(annotation)
    return kwargs


def _scalar_type(annotation: Any) -> Any:
    # Annotated[float, Field(...)] -> float
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
    return base if base in (int, float, str) else str


def _help_text(info: FieldInfo) -> str:
    text = " ".join((info.description or "").split())
    return text.replace("%", "%%")  # argparse %-formats help strings


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}: {text!r}")
    return value
