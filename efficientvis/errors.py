"""The one exception type that the command line turns into a one-line message and exit code 1."""


class UserError(Exception):
    """Bad input from the user (file, video, frame, tensor, option): the message names the culprit."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: a UserError's own message, anything else as its type and the
    first line of its message (a library's multi-line error report cut short)."""
    if isinstance(e, UserError):
        return str(e)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__
