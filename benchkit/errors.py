"""Errors the CLI turns into one clear line per problem (exit status 2), never a traceback."""
from __future__ import annotations


class BadInput(Exception):
    """One or more problems with user input; each problem is one line naming file and key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class MissingAsset(BadInput):
    """A checkpoint or data file that is not on disk (nothing is downloaded at run time)."""
