"""Writing a bundle atomically, and never touching what we did not write.

Everything goes to a staging directory next to ``OUT`` and is renamed into place at the end.
A failed or interrupted compile (exception, Ctrl-C, SIGTERM, SIGHUP) leaves nothing at
``OUT`` and removes its staging directory. A staging directory left by a compile that was
killed outright (SIGKILL, power loss) carries a marker naming its writer process; the next
compile into the same parent removes it once that process is gone.

What ``OUT`` may be (checked before any expensive work, and again just before the rename):

- a path that does not exist yet (its parent must exist), or
- with ``force`` only: an empty directory or a previous bundle of ours (``manifest.json``
  with our schema, and no file the manifest does not list);
- never the current directory or one of its parents, never the model directory, anything
  above it, or an existing directory inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from ..errors import UsageError, WriteError
from .manifest import MANIFEST, SCHEMA, SIGNATURE

# The marker file inside a staging directory: {"tool", "pid", "created"}. Removed before the
# bundle is hashed and moved into place, so no bundle carries it.
STAGING_MARKER = ".qwen3vl-compile-staging.json"
_TOOL = "qwen3vl-compile"
_HANGUP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


def _is_within(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or lies below it (both resolved)."""
    return path == root or root in path.parents


def bundle_problem(path: Path) -> str | None:
    """Why the existing directory ``path`` is not a bundle that ``--force`` may replace, or
    None when it is one (or is empty)."""
    entries = list(path.iterdir())
    if not entries:
        return None
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"it holds files and no {MANIFEST} (e.g. {entries[0].name!r})"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {MANIFEST} is not readable JSON"
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        return f"its {MANIFEST} is not a qwen3vl-compile manifest"
    known = set(manifest.get("files") or {}) | {MANIFEST, SIGNATURE}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if (p.is_file() or p.is_symlink()) and rel not in known:
            return f"it holds {rel!r}, which the bundle's manifest does not list"
    return None


class BundleWriter:
    """``with BundleWriter(out, force=..., protected=[model_dir]) as staging: ...; writer.commit()``."""

    def __init__(self, out: Path, *, force: bool = False, protected: tuple[Path, ...] | list[Path] = (), log=None):
        self.requested = str(out)
        self.out = Path(os.path.abspath(os.path.expanduser(str(out) or "."))).resolve()
        self.force = force
        self.protected = [Path(p).resolve() for p in protected]
        self.staging: Path | None = None
        self._committed = False
        self._old_handlers: dict[int, object] = {}
        self._log = log or (lambda msg: None)

    def protect(self, path: Path) -> None:
        """Add a directory (the resolved model) that the output may not replace or contain."""
        self.protected.append(Path(path).resolve())
        self.check_target()

    def check_target(self) -> None:
        out = self.out
        shown = self.requested if self.requested not in ("", ".") else f"{self.requested!r} ({out})"
        cwd = Path.cwd().resolve()
        if _is_within(cwd, out):
            what = "the current directory" if out == cwd else "a parent of the current directory"
            raise UsageError(f"-o {shown} is {what}; name a new directory for the bundle")
        for model in self.protected:
            if _is_within(model, out):
                what = "the model directory" if out == model else "a parent of the model directory"
                raise UsageError(f"-o {shown} is {what} {model}; name a new directory for the bundle")
            if out.exists() and _is_within(out, model):
                raise UsageError(f"-o {shown} is an existing path inside the model directory {model}; "
                                 "name a new directory for the bundle")
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise UsageError(f"-o {shown} exists and is not a directory; name a new directory for the bundle")
            problem = bundle_problem(out)
            if problem is not None:
                raise UsageError(f"-o {shown} exists and is not a qwen3vl-compile bundle ({problem}); "
                                 "--force replaces only a previous bundle or an empty directory")
            if not self.force:
                raise UsageError(f"output {out} already exists; pass --force to replace it")
        parent = out.parent
        if not parent.is_dir():
            raise UsageError(f"output parent directory {parent} does not exist")

    def __enter__(self) -> Path:
        self.check_target()
        for stale in remove_stale_staging(self.out.parent):
            self._log(f"removed {stale}, left by an earlier compile that was killed")
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-{os.getpid()}-", dir=self.out.parent))
            (self.staging / STAGING_MARKER).write_text(
                json.dumps({"tool": _TOOL, "pid": os.getpid(), "created": time.time()}))
        except OSError as e:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            raise WriteError(f"cannot create a staging directory in {self.out.parent}: {e.strerror or e}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.staging, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary directory
        # SIGTERM and SIGHUP (a closed terminal) become exceptions, so the staging directory
        # is cleaned up as on Ctrl-C.
        for sig in _HANGUP_SIGNALS:
            try:
                self._old_handlers[sig] = signal.signal(sig, _raise_interrupt)
            except ValueError:  # not in the main thread
                pass
        return self.staging

    def commit(self) -> Path:
        assert self.staging is not None
        (self.staging / STAGING_MARKER).unlink(missing_ok=True)
        self.check_target()  # OUT may have been created or filled during the compile
        old = None
        try:
            if self.out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent))
                (old / STAGING_MARKER).write_text(
                    json.dumps({"tool": _TOOL, "pid": os.getpid(), "created": time.time()}))
                os.rename(self.out, old / "bundle")
            os.rename(self.staging, self.out)
        except OSError as e:
            if old is not None and not self.out.exists() and (old / "bundle").exists():
                os.rename(old / "bundle", self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            raise WriteError(f"could not move the bundle into {self.out}: {e}") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.out

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        if self.staging is not None and not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)


def _process_started(pid: int) -> float | None:
    """Start time (epoch seconds) of a live process, or None when there is none."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the compile extra
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return float("-inf")  # alive, start unknown: assume it is the writer
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return float("-inf")


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove staging (and half-replaced ``.old``) directories in ``parent`` that carry our
    marker and whose writer process is gone (or whose pid now belongs to a process that
    started after the directory was made). Returns what was removed."""
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(".") and (".staging-" in p.name or ".old-" in p.name)]
    except OSError:
        return removed
    for d in candidates:
        marker = d / STAGING_MARKER
        if d.is_symlink() or not d.is_dir() or not marker.is_file():
            continue
        try:
            info = json.loads(marker.read_text())
            pid, created = int(info["pid"]), float(info["created"])
            if info.get("tool") != _TOOL:
                continue
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            continue
        started = _process_started(pid)
        if started is not None and started <= created:
            continue  # the writer is still running
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed


def _raise_interrupt(signum, frame):  # pragma: no cover - exercised by signal tests
    raise KeyboardInterrupt(f"signal {signum}")
