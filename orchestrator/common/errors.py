"""Errors a user can act on.

`UserError` is bad input (exit 2); `EnvironmentProblem` is a machine or
service that is not in the state we need (exit 1). Both carry a message
that says what, where and what to do, and are printed without a traceback.
"""


class OrchestratorError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UserError(OrchestratorError):
    """Bad input: a malformed project file, an unknown backend, a tampered digest."""

    exit_code = 2


class SpecError(UserError):
    """A problem in the project file, located by file and key path."""

    def __init__(self, file: str, key: str, message: str, hint: str | None = None):
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {message}", hint)
        self.file = file
        self.key = key


class EnvironmentProblem(OrchestratorError):
    """The engine, registry or a tool is missing or unreachable."""

    exit_code = 1
