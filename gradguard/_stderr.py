"""The one way gradguard writes a line of its own to stderr: it never raises."""

from __future__ import annotations

import contextlib
import sys


def say(message: str) -> None:
    """Write ``message`` as one line to the current ``sys.stderr``, flushed.

    A closed or broken stderr loses the line, and with no stderr at all
    (``2>&-``, ``pythonw``) there is nowhere to say it: gradguard must never
    be what fails the job, nor write to its stdout, even while telling it
    something.
    """
    stream = sys.stderr
    if stream is None:  # print(file=None) would write to stdout
        return
    with contextlib.suppress(Exception):
        stream.write(message + "\n")
        stream.flush()
