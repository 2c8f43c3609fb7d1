"""What every command-line entry point does around its work: a typed error is one line
(``PROG: error: [stage] ...``) and its exit code, Ctrl-C is exit 130, text that cannot be
encoded for the terminal (``PYTHONIOENCODING=ascii``) is escaped rather than raising, and
output piped into a command that closed early (``| head``, ``| true``) is not an error of ours."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable

from .errors import Qwen3VLCompileError
from .testhooks import pause


def run_cli(main: Callable[[], int], prog: str, *, interrupted: str | Callable[[], str] = "interrupted",
            exiting: bool = False) -> int:
    """Run ``main`` as the command ``prog``. ``interrupted`` is the line printed on Ctrl-C
    (or a function giving it, asked at that moment: what the interrupt left behind).
    ``exiting``: this is the process's entry point (the console script), which ends when this
    returns; Ctrl-C from then on (interpreter shutdown, atexit callbacks) is ignored, since
    the work is done and its outcome printed: no 'Exception ignored in atexit' traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a TextIOWrapper (captured in tests)
            pass
    try:
        return _run(main, prog, interrupted)
    finally:
        if exiting:
            _ignore_interrupts_from_now_on()


def _run(main: Callable[[], int], prog: str, interrupted: str | Callable[[], str]) -> int:
    try:
        try:
            code = main()
        except Qwen3VLCompileError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print(f"\n{prog}: {interrupted if isinstance(interrupted, str) else interrupted()}", file=sys.stderr)
            return 130
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away: whatever we had to do is done.
        _silence_stdout()
        return 0
    except OSError as e:
        # Standard output itself cannot be written (``> /dev/full``, a full disk): the work is
        # done (a compiled bundle is complete), only its report is lost. Any other OSError is
        # not ours to explain here.
        if not _stdout_broken():
            raise
        print(f"{prog}: error: [output] cannot write to standard output: {e.strerror or e} "
              "(the work itself finished; only this report was lost)", file=sys.stderr)
        _silence_stdout()
        return 1


def _stdout_broken() -> bool:
    try:
        sys.stdout.flush()
    except OSError:
        return True
    return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _ignore_interrupts_from_now_on() -> None:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the interpreter keeps SIG_IGN through finalization
    except ValueError:  # not in the main thread
        return
    import atexit

    atexit.register(pause, "atexit")  # test hook: registered last, so it runs first


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: [arguments] ...``,
    exit 2) instead of the usage block then the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: [arguments] {message} (see --help)\n")
