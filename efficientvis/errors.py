"""The one exception type that the command line turns into a one-line message and exit code 1."""


class UserError(Exception):
    """Bad input from the user (file, video, frame, tensor, option): the message names the culprit."""
