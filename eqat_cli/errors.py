"""Known failures. The CLI maps every :class:`EqatError` to one line and exit code 2."""

from __future__ import annotations


class EqatError(Exception):
    """A failure the user can act on. ``str(err)`` is the one-line message."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class BadInputError(EqatError):
    """A path, value or file that cannot be used as given."""


class UnsupportedError(EqatError):
    """A valid request that this format, backend or layer cannot represent."""


class DiskFullError(EqatError):
    """The file system filled up while eqat wrote ``path``; exit code 1 (not the input's fault)."""

    exit_code = 1

    def __init__(self, path: object, detail: str = "no space left on device"):
        super().__init__(
            f"disk full while writing {path} ({detail})",
            hint="finished work is kept; free space and re-run the same command to resume",
        )


class OutputBusyError(EqatError):
    """Another eqat process is writing the same output (it holds ``OUT.lock``)."""

    def __init__(self, output: object, pid: int | None):
        who = f"PID {pid}" if pid else "a process whose PID is not recorded"
        super().__init__(f"output {output} is being written by another eqat process ({who}); "
                         f"wait for it to finish, or pass --wait to queue behind it")
        self.pid = pid


class UnknownArchitectureError(EqatError):
    pass


class MissingDependencyError(EqatError):
    def __init__(self, package: str, purpose: str, install: str | None = None):
        super().__init__(
            f"{purpose} needs the optional package '{package}', which is not installed",
            hint=f"install it with: {install or 'pip install ' + package}",
        )
