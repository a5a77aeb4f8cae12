"""One exception type for every user-facing problem.

The CLI prints `minip2p: <message>` and exits with status 2 -- never a traceback. So each message
is one line that says what was wrong and what to do about it.
"""


class MinipError(Exception):
    """A problem with the user's input (files, options, prompts), explained in one line."""
