"""Errors h1tune shows to users: one message that says what is wrong and what to change."""


class H1tuneError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback."""


class ConfigError(H1tuneError):
    """One or more problems in a config, all reported at once, each prefixed with its path."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = len(self.problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({count} problem{'s' if count != 1 else ''}):\n{body}")


class DataError(H1tuneError):
    """Bad training data: names the file, line or row and what was expected."""
