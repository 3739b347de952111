"""ConfigError: one exception for every bad configuration input, one line per problem."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypedDict

from pydantic import ValidationError

__all__ = ["ConfigError", "Problem", "format_value", "one_problem", "problem"]


class Problem(TypedDict):
    """One thing wrong with a configuration, as exposed by `ConfigError.errors`."""

    field: str | None
    """Dotted path of the offending field (`adam_betas[0]`), or None for a document-level problem."""
    value: Any
    """The offending value as it was given."""
    message: str
    """The full, self-contained line: field, value, reason and what is valid."""
    reason: str
    """Why the value was rejected."""
    valid: str | None
    """What would be accepted instead, when it can be said."""


_MAX_VALUE_CHARS = 80


def format_value(value: Any) -> str:
    """Render a value the way it appears in messages: `5`, `True`, `None`, `'deep speed'`."""
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def problem(
    field: str | None,
    value: Any,
    reason: str,
    valid: str | None = None,
    *,
    owner: str = "StrategyConfig",
) -> Problem:
    """Build one `Problem`; its message reads `Owner.field=value is invalid: reason (valid: ...)`."""
    if field is None:
        message = f"{owner}: {reason}"
    else:
        message = f"{owner}.{field}={format_value(value)} is invalid: {reason}"
    if valid:
        message += f" (valid: {valid})"
    return Problem(field=field, value=value, message=message, reason=reason, valid=valid)


def one_problem(
    field: str | None,
    value: Any,
    reason: str,
    valid: str | None = None,
    *,
    owner: str = "StrategyConfig",
) -> ConfigError:
    """A ConfigError holding the single problem `problem(...)` describes."""
    return ConfigError([problem(field, value, reason, valid, owner=owner)])


class ConfigError(ValueError):
    """Invalid configuration: the message has one line per problem, `.errors` has one dict per problem.

    Each line names the field, the offending value and what would be valid, e.g.
    `StrategyConfig.zero_stage=5 is invalid: Input should be less than or equal to 3 (valid: 0, 1, 2 or 3)`.
    When the problem came from pydantic, the `pydantic.ValidationError` is the `__cause__`.
    """

    errors: list[Problem]
    """One entry per problem, with keys field, value, message, reason and valid."""

    def __init__(self, problems: str | Iterable[Problem]) -> None:
        if isinstance(problems, str):
            found = [Problem(field=None, value=None, message=problems, reason=problems, valid=None)]
        else:
            found = list(problems)
        self.errors = found
        super().__init__("\n".join(p["message"] for p in found))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[Problem]]]:
        # Keep `.errors` across pickling (errors raised in worker processes reach the launcher).
        return (type(self), (self.errors,))

    @classmethod
    def from_validation_error(
        cls,
        exc: ValidationError,
        *,
        owner: str,
        describe_valid: Callable[[str], str | None],
    ) -> ConfigError:
        """Translate pydantic's errors into our one-line-per-problem form.

        `describe_valid(field_name)` says what the field accepts; a ConfigError raised inside a model
        validator (cross-field rules) is carried through unchanged.
        """
        found: list[Problem] = []
        for error in exc.errors():
            carried = error.get("ctx", {}).get("error")
            if isinstance(carried, ConfigError):
                found.extend(carried.errors)
                continue
            loc = error["loc"]
            reason = _strip_prefix(error["msg"])
            if not loc:
                found.append(problem(None, error.get("input"), reason, owner=owner))
                continue
            field = str(loc[0])
            if error["type"] == "missing" and len(loc) > 1:
                # A short tuple: pydantic points at the absent item but its input is the container.
                reason = f"item {_format_loc_part(loc[-1])} is missing"
                loc = loc[:-1]
            path = field + "".join(_format_loc_part(part) for part in loc[1:])
            found.append(problem(path, error.get("input"), reason, describe_valid(field), owner=owner))
        return cls(found)


def _format_loc_part(part: str | int) -> str:
    return f"[{part}]" if isinstance(part, int) else f"[{part!r}]"


def _strip_prefix(message: str) -> str:
    # pydantic prefixes messages of ValueErrors raised in validators; the prefix says nothing useful.
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message
