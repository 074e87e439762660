"""Errors that speak to the user.

``InputError`` is raised for anything the user can fix (a bad file, a bad option). Its message
is one line naming the file (when there is one) and the problem; the CLI prints it and exits 2.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """A user-fixable problem with an input file, an option or a directory."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
