"""User-facing errors: each one prints as a single line and maps to an exit code.

`InputError` is for anything the user gave us that we cannot accept (a spec, a data file, a
budget): exit code 2. `KsgError` is for everything else we detected and can explain: exit 1.
"""

from __future__ import annotations

from pathlib import Path


class KsgError(Exception):
    """An error with a message fit for the user; the CLI prints it on one line."""

    exit_code = 1

    def __str__(self) -> str:
        # One line, whatever the message carried: tracebacks and multi-line dumps are for bugs.
        return " ".join(super().__str__().split())


class InputError(KsgError):
    """Bad input: a malformed file, a wrong field, an impossible setting."""

    exit_code = 2


def data_error(file: str | Path, message: str, *, line: int | None = None, field: str | None = None) -> InputError:
    """Build an InputError that names where the problem is: `file:line: field 'x': message`."""
    where = str(file) if line is None else f"{file}:{line}"
    what = message if field is None else f"field '{field}': {message}"
    return InputError(f"{where}: {what}")


class SpecError(InputError):
    """A spec setting found impossible only once the data is read (a partition no split
    satisfies, a holdout larger than a client's data): the message starts with the spec key, and
    the command that read the spec file puts the file's name before it (`in_file`)."""

    def in_file(self, spec_file: str | Path) -> InputError:
        return InputError(f"{spec_file}: {self}")
