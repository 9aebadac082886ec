"""Errors a user can cause and fix: the CLI prints them as one line, never a traceback."""


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
