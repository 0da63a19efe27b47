"""Errors raised for bad input. Each names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """An input file cannot be used.

    The message always starts with the file's path so that a batch report
    points the user straight at the bad file.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DeviceUnavailable(RuntimeError):
    """The device asked for (e.g. ``cuda``) does not exist on this machine:
    a usage error (exit 2 from the CLI), not a crash."""


class SettingsMismatch(ValueError):
    """Training settings that do not fit the preprocessed data (e.g. a
    patch larger than the images, or a network that needs the image side to
    be a multiple it is not): a usage error (exit 2 from the CLI)."""
