"""``fedq-simulate``'s entry point: Ctrl-C and ``kill PID`` are handled from its first
instant, not only once the run is under way.

Importing the driver (:mod:`fedq.simulations.run`: Flower, numpy, gymnasium; about 1.3 s
here, longer on a Raspberry Pi) happens before its ``main`` can install its handlers, so a
Ctrl-C in that window printed Python's ``KeyboardInterrupt`` traceback, and a ``kill PID``
ended the process without a word. This module imports nothing heavy: it installs a handler
that ends the command with one line and the usual exit code (130 / 143), then imports the
driver, whose ``main`` takes over the signals where its run starts.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _before_the_run(signum: int, frame: FrameType | None) -> None:
    print("fedq-simulate: interrupted before the run was submitted; nothing ran, nothing "
          "to resume.", file=sys.stderr)
    sys.exit(128 + signum)


def main() -> int:
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job ignores it
        signal.signal(signal.SIGINT, _before_the_run)
    signal.signal(signal.SIGTERM, _before_the_run)
    from fedq.simulations import run

    return run.main()
