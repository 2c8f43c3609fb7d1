"""Writing a bundle atomically: everything goes to a staging directory next to ``OUT`` and
is renamed into place at the end. A failed or interrupted compile leaves nothing at ``OUT``
(and removes its staging directory); an existing ``OUT`` is only replaced with ``force``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import UsageError, WriteError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class BundleWriter:
    """``with BundleWriter(out, force) as staging: ...; writer.commit()``."""

    def __init__(self, out: Path, *, force: bool = False):
        self.out = Path(out).resolve()
        self.force = force
        self.staging: Path | None = None
        self._committed = False
        self._old_handler = None

    def check_target(self) -> None:
        if self.out.exists() and not self.force:
            raise UsageError(f"output {self.out} already exists; pass --force to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"output {self.out} exists and is not a directory")
        parent = self.out.parent
        if not parent.is_dir():
            raise UsageError(f"output parent directory {parent} does not exist")

    def __enter__(self) -> Path:
        self.check_target()
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.staging, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary directory
        # SIGTERM is turned into an exception so the staging directory is cleaned up too.
        try:
            self._old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not in the main thread
            self._old_handler = None
        return self.staging

    def commit(self) -> Path:
        assert self.staging is not None
        old = None
        try:
            if self.out.exists():
                if not self.force:
                    raise UsageError(f"output {self.out} appeared during the compile; pass --force to replace it")
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                os.rename(self.out, old)
            os.rename(self.staging, self.out)
        except OSError as e:
            if old is not None and not self.out.exists():
                os.rename(old, self.out)
            raise WriteError(f"could not move the bundle into {self.out}: {e}") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        if self.staging is not None and not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)


def _raise_interrupt(signum, frame):  # pragma: no cover - exercised by signal tests
    raise KeyboardInterrupt(f"signal {signum}")
