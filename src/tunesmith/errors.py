"""The one exception tree. The CLI prints `message` and `hint` and exits with `exit_code`."""

from __future__ import annotations


class TunesmithError(Exception):
    """Base of every error tunesmith raises on purpose; the CLI shows it without a traceback."""

    exit_code = 2
    silent = False  # the CLI prints nothing (another process has said why)

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class RecipeError(TunesmithError):
    """One or more problems in a recipe; `problems` holds each as a line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}",
                         "fix each line above; `tunesmith init` writes a commented starter recipe")


class DataError(TunesmithError):
    """A data file that cannot be used as a whole (missing, unreadable, too many rejects)."""


class ModelError(TunesmithError):
    """A model that cannot be found or loaded."""


class RunError(TunesmithError):
    """A run folder that is missing, incomplete, or in the way."""
