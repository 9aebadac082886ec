"""Errors a user can cause and fix: the CLI prints them as one line, never a traceback."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A problem with input the user controls: config, arguments, files, the host.

    The message is one line naming what is wrong and what to do about it.
    """

    exit_code = 2


class ConfigError(UserError):
    """The config document is missing, unreadable or invalid.

    ``problems`` holds one line per invalid field when validation found several.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


def describe_value(value: Any) -> str:
    """An offending value quoted for a one-line message: JSON, cut to 60 characters."""
    import json  # not at the top: the CLI imports this module at start-up

    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
