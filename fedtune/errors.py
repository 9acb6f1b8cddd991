"""The one error type for bad input from a person (a file, a flag, a config value, a data row).

Library code raises :class:`UserError` with one line that names what was wrong (the file, field or value)
and how to fix it; the CLI prints that line and exits 2. Anything else that escapes is a bug in fedtune.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: ``str(err)`` is one line naming the file, field or value, what was expected and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def not_utf8(path, err: UnicodeDecodeError, what: str = "file") -> UserError:
    """A file that is not UTF-8 text, with the offending byte and its position."""
    byte = err.object[err.start:err.start + 1].hex()
    return UserError(f"{path}: the {what} is not UTF-8 text (byte 0x{byte} at offset {err.start}); "
                     "save it as UTF-8")
