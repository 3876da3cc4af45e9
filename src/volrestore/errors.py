"""User-caused errors: one line that says what is wrong and what to do; the CLI turns them into exit code 2."""


class UserError(Exception):
    """An error the user can fix. The message is one line: the problem, then what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
