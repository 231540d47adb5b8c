"""User-facing errors.

Contract: ``UserError`` is raised for anything the user can fix (bad argument, missing
data, unreadable checkpoint). Its message is one line that says what to do. The CLI
prints it as ``asge-edge: error: <message>`` and exits 2, with no traceback. Every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class Interrupted(Exception):
    """A signal stopped a run (SIGINT or SIGTERM) and its state was saved; the message says how
    to go on. The CLI exits 128 + ``signum``, as a shell reports a process that the signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
