"""cli: the Typer application behind the ``pathdb`` command.

Launched as the command (``pathdb`` or ``python -m cli...``), a Ctrl-C that lands while the CLI's
modules are still importing ends the process with exit status 130 and no traceback; from
``cli.app.main`` on it is a normal KeyboardInterrupt, which ``main`` reports.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

_APP_FILE = os.path.join("cli", "app.py")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT handler: KeyboardInterrupt inside ``cli.app.main``, else a quiet exit 130."""
    f = frame
    while f is not None:
        if f.f_code.co_name == "main" and f.f_code.co_filename.endswith(_APP_FILE):
            raise KeyboardInterrupt
        f = f.f_back
    os.write(2, b"interrupted\n")
    os._exit(130)


if (
    os.path.basename(sys.argv[0]) in ("pathdb", "-m")
    and threading.current_thread() is threading.main_thread()
):
    signal.signal(signal.SIGINT, _interrupt)
