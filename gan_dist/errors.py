"""The one exception type for mistakes a user can fix (bad config, missing or corrupt data, bad checkpoint path).

`train.py` and the scripts print its message alone, without a traceback, and exit with its code. A `quiet` copy is
what the other ranks raise when the main process has already printed the message.
"""


class UserError(Exception):
    def __init__(self, message: str, code: int = 1, quiet: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.quiet = quiet
