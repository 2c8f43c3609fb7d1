"""What every command-line entry point does around its work: a typed error is one line
(``PROG: error: [stage] ...``) and its exit code, Ctrl-C is exit 130, text that cannot be
encoded for the terminal (``PYTHONIOENCODING=ascii``) is escaped rather than raising, and
output piped into a command that closed early (``| head``, ``| true``) is not an error of ours.

Standard output that cannot be written (closed with ``>&-``, ``> /dev/full``) is an
``[output]`` error on stderr, exit 1. Nothing meant for stderr ever goes to stdout: with stderr
closed (``2>&-``) errors and progress are dropped and only the exit code tells."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Callable

from .errors import OutputError, Qwen3VLCompileError
from .testhooks import pause


class _Stdout:
    """sys.stdout for the length of a command: a write or flush that fails (a closed stdout,
    ``/dev/full``) is an OutputError; a closed pipe stays a BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def _fail(self, why: str):
        raise OutputError(f"cannot write to standard output: {why}")

    def write(self, text):
        if self._stream is None:
            self._fail("it is closed")
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            self._fail(e.strerror or str(e))

    def flush(self):
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            self._fail(e.strerror or str(e))

    def isatty(self):
        return self._stream is not None and self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Stderr:
    """sys.stderr for the length of a command: what cannot be written (stderr closed with
    ``2>&-``, or full) is dropped, never sent to stdout and never an error of its own."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text) if self._stream is not None else len(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self):
        try:
            if self._stream is not None:
                self._stream.flush()
        except (OSError, ValueError):
            pass

    def isatty(self):
        try:
            return self._stream is not None and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _silence_stdout(stream) -> None:
    """Point fd 1 at /dev/null (when ``stream`` is the process's own stdout) so that the
    interpreter's final flush of what is still buffered does not fail again (and print
    "Exception ignored") once we have given up on stdout."""
    if stream is not sys.__stdout__:  # captured or replaced (tests): leave fd 1 alone
        return
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 1:
            os.dup2(fd, 1)
            os.close(fd)
    except OSError:
        pass


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
        except (AttributeError, ValueError):  # not a TextIOWrapper (captured in tests), or closed (None)
            pass
    for fd in (1, 2):  # a closed fd 1 or 2 would be handed to the next file opened: hold it with /dev/null
        try:
            os.fstat(fd)
        except OSError:
            try:
                held = os.open(os.devnull, os.O_WRONLY)
                if held != fd:
                    os.dup2(held, fd)
                    os.close(held)
            except OSError:
                pass
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Stdout(saved[0]), _Stderr(saved[1])
    try:
        return _run(main, prog, interrupted, saved)
    finally:
        sys.stdout, sys.stderr = saved
        if exiting:
            _ignore_interrupts_from_now_on()


def _run(main: Callable[[], int], prog: str, interrupted: str | Callable[[], str], saved) -> int:
    try:
        try:
            code = main()
            try:
                sys.stdout.flush()
            except OutputError as e:  # only the final flush failed: a compiled bundle is complete
                raise OutputError(f"{e.args[0]} (the work itself finished; only this report was lost)") from None
            return code
        except OutputError as e:
            _silence_stdout(saved[0])
            _say(f"{prog}: error: {e}")
            return e.exit_code
        except Qwen3VLCompileError as e:
            _say(f"{prog}: error: {e}")
            return e.exit_code
        except KeyboardInterrupt:
            _say(f"\n{prog}: {interrupted if isinstance(interrupted, str) else interrupted()}")
            return 130
    except BrokenPipeError:
        # The reader went away: whatever we had to do is done.
        _silence_stdout(saved[0])
        return 0


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


def _positive(kind: type, what: str):
    """An argparse ``type``: a positive (finite) ``kind``, else a one-line arguments error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def add_video_options(parser: argparse.ArgumentParser) -> None:
    """The video sampling options of qwen3vl-run and qwen3vl-serve, checked here (positive
    numbers; anything else is a one-line ``[arguments]`` error, exit 2); :func:`video_options`
    gives them as ``Pipeline.load`` keywords. Unset, the bundle's video_preprocessor_config.json
    decides."""
    parser.add_argument("--video-fps", type=_positive(float, "a positive number"), default=None,
                        help="frames sampled per second of video (default: the checkpoint's, 2)")
    parser.add_argument("--max-frames", type=_positive(int, "a whole number >= 1"), default=None,
                        help="most frames sampled from one video (default: the checkpoint's, 768)")
    parser.add_argument("--video-max-pixels", type=_positive(int, "a whole number >= 1"), default=None,
                        help="most pixels of one video's sampled frames together, after resizing "
                             "(default: the checkpoint's)")


def video_options(args) -> dict:
    """The parsed video options as ``Pipeline.load`` keywords."""
    return {"video_fps": args.video_fps, "max_frames": args.max_frames, "video_max_pixels": args.video_max_pixels}
