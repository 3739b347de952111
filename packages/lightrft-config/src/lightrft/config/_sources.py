"""Read configuration values out of whatever a training script has: a dict, a Namespace, an object."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from ._errors import one_problem

__all__ = ["values_from_object"]

# Containers and scalars that hold no named settings: passing one is a caller's mistake, not an
# empty configuration.
_REJECTED = (str, bytes, bytearray, int, float, complex, bool, list, tuple, set, frozenset, type(None))

_ACCEPTED = (
    "a StrategyConfig, a Mapping, an argparse.Namespace, a dataclass instance or an object with attributes"
)


def values_from_object(obj: Any, *, owner: str) -> dict[str, Any]:
    """Return the name -> value pairs that `obj` carries, without validating them."""
    if isinstance(obj, Mapping):
        bad_keys = [key for key in obj if not isinstance(key, str)]
        if bad_keys:
            raise one_problem(
                None,
                bad_keys[0],
                f"from_args got a mapping with a non-string key {bad_keys[0]!r}",
                owner=owner,
            )
        return dict(obj)
    if isinstance(obj, _REJECTED) or isinstance(obj, type):
        kind = "the class " + obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise one_problem(
            None, obj, f"from_args cannot read a config from {kind} {obj!r:.60}", _ACCEPTED, owner=owner
        )
    if isinstance(obj, argparse.Namespace):
        return dict(vars(obj))
    if isinstance(obj, BaseModel):
        return dict(obj)  # declared fields plus extras
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        try:
            return dataclasses.asdict(obj)
        except Exception:  # asdict deep-copies values; some (locks, handles) refuse to be copied
            return {field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)}
    return _public_attributes(obj)


def _public_attributes(obj: Any) -> dict[str, Any]:
    # Instance attributes first (vars), then public non-callable attributes that only dir() sees:
    # class-level defaults, __slots__ members and properties.
    values = {name: value for name, value in getattr(obj, "__dict__", {}).items() if not name.startswith("_")}
    for name in dir(obj):
        if name.startswith("_") or name in values:
            continue
        try:
            value = getattr(obj, name)
        except Exception:  # a property that fails to compute is not a setting we can read
            continue
        if not callable(value):
            values[name] = value
    return values
