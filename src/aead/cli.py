"""Entry-point helpers shared by the stage scripts: one clear line and exit code 1 for bad input."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

from aead.errors import AeadError


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_stage(main: Callable[[], None]) -> None:
    """Run ``main``; an :class:`AeadError` prints ``error: <message>`` on stderr and exits with 1.

    SIGTERM is handled like Ctrl-C, so temporary files are removed on the way out."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except AeadError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no outputs were written for the unfinished work", file=sys.stderr)
        sys.exit(130)


def log(message: str) -> None:
    """Progress on the terminal, flushed at once (DVC shows stage output live)."""
    print(message, flush=True)
