"""The one exception type the CLI turns into a single line and exit code 2.

Raise `UserError` for anything the user can fix (a path, a field, a missing package); every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""
