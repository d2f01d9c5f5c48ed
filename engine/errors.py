"""Errors a user can act on. The CLI prints their lines (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input: a recipe, a data file, a command-line argument. Holds one line per problem."""

    exit_status = 2

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class RunFailed(Exception):
    """A run that started and could not finish (disk full, non-finite loss). Exit status 1."""

    exit_status = 1


class Interrupted(Exception):
    """A run stopped by SIGTERM or Ctrl-C after writing a checkpoint. Exit status 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum
