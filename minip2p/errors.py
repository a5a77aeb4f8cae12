"""One exception type for every user-facing problem.

The CLI prints `minip2p: <message>` and exits with status 2 -- never a traceback. So each message
is one line that says what was wrong and what to do about it. A bad value of one parameter is a
`ParameterError`: it names the parameter as Python spells it (`start_step`), and the command line
names the flag its user typed instead (`--masa-step`).
"""
from __future__ import annotations

import re


class MinipError(Exception):
    """A problem with the user's input (files, options, prompts), explained in one line."""


class ParameterError(MinipError):
    """A bad value of one parameter: `name` (as in Python) and what is wrong with it. The problem
    may name other parameters as {name}; `said(spell)` spells them (the CLI: as flags)."""

    def __init__(self, name: str | None, problem: str):
        self.name, self.problem = name, problem           # name None: about several of them
        super().__init__(self.said(str) if name is None else f"{name} {self.said(str)}")

    def said(self, spell) -> str:
        return re.sub(r"\{([a-z_]+)\}", lambda m: spell(m.group(1)), self.problem)
