"""One exception type for problems the user can fix (bad flags, files, configs).

The CLI turns it into a single message on stderr and exit code 2, never a traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo  # False on ranks that only mirror another rank's error


class PreemptedExit(SystemExit):
    """Raised after a signal-triggered checkpoint; Slurm scripts requeue on this exit code."""

    CODE = 124

    def __init__(self):
        super().__init__(self.CODE)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages), else its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
