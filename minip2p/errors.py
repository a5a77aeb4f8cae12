"""One exception type for every user-facing problem.

The CLI prints `minip2p: <message>` and exits with status 2 -- never a traceback. So each message
is one line that says what was wrong and what to do about it. A bad value of one parameter is a
`ParameterError`: it names the parameter as Python spells it (`start_step`), and the command line
names the flag its user typed instead (`--masa-step`).
"""


class MinipError(Exception):
    """A problem with the user's input (files, options, prompts), explained in one line."""


class ParameterError(MinipError):
    """A bad value of one parameter: `name` (as in Python) and what is wrong with it."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem
