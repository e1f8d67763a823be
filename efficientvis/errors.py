"""The one exception type that the command line turns into a one-line message and exit code 1."""


class UserError(Exception):
    """Bad input from the user (file, video, frame, tensor, option): the message names the culprit."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line: a UserError's own message, anything else as its type and the
    first line of its message (a library's multi-line error report cut short)."""
    if isinstance(e, UserError):
        text = str(e)
        if "\nOriginal Traceback" in text:  # re-raised by a torch DataLoader worker, traceback and all
            text = text.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        return text
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__
