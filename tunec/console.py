"""What the ``tunec`` command prints from the library's ``logging`` records.

The library (compiler and runtime) reports through loggers under ``tunec``
and never prints; the command line shows INFO records on stdout as plain
lines (``step 90/100: loss 2.2524, ...``) and warnings on stderr as
``warning: ...``. Lines go through ``tqdm.write`` so that a progress bar on
the terminal is cleared and redrawn around them instead of being torn.
"""

from __future__ import annotations

import logging
import sys


class ConsoleHandler(logging.Handler):
    """stdout for INFO, stderr for WARNING and above, looked up at each record (click's test
    runner, like a user's redirection, swaps the streams after the handler exists)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            text = self.format(record)
            if record.levelno >= logging.WARNING:
                tqdm.write(f"{record.levelname.lower()}: {text}", file=sys.stderr)
            else:
                tqdm.write(text, file=sys.stdout)
            (sys.stderr if record.levelno >= logging.WARNING else sys.stdout).flush()
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


def configure(level: int = logging.INFO) -> None:
    """Send the ``tunec`` loggers to the console (once per process, however often it is called)."""
    root = logging.getLogger("tunec")
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleHandler())
    root.setLevel(level)
