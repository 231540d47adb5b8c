"""User-facing errors.

Contract: ``UserError`` is raised for anything the user can fix (bad argument, missing
data, unreadable checkpoint). Its message is one line that says what to do. The CLI
prints it as ``asge-edge: error: <message>`` and exits 2, with no traceback. Every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class Interrupted(Exception):
    """The user stopped a run (SIGINT) and its state was saved; the message says how to go on."""
