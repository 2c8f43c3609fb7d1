"""Writing a bundle atomically, and never touching what we did not write.

Everything goes to a staging directory next to ``OUT`` and is renamed into place at the end.
A failed or interrupted compile (exception, Ctrl-C, SIGTERM, SIGHUP) leaves ``OUT`` as it
was and removes its staging directory. A staging directory left by a compile that was
killed outright (SIGKILL, power loss) carries a marker naming its writer process; the next
compile into the same parent removes it once that process is gone.

Replacing a bundle (``force``): the old bundle is moved to ``.OUT.old-PID-*/bundle``, the new
one to ``OUT``; Ctrl-C, SIGTERM and SIGHUP are held back over those two renames, so from the
user's view the swap is one step: ``OUT`` is the old bundle or the new one, never neither.
Then the old copy is deleted (an interrupt there leaves its remains, which the next compile
removes since ``OUT`` holds the new bundle). An ``.old`` directory is never deleted while
``OUT`` is missing: it holds the only copy of the bundle, and the next compile moves it back.

What ``OUT`` may be (checked before any expensive work, and again just before the rename):

- a path that does not exist yet (its parent must exist), or
- with ``force`` only: an empty directory or a previous bundle of ours that passes the
  bundle check (``manifest.json`` with our schema and version, matching its own hash, every
  listed file present with its recorded hash) and holds nothing else but its signature
  (``model.sig``): no unlisted file,
  directory, symbolic link, FIFO or socket;
- never the current directory or one of its parents, never the model directory, anything
  above it, or an existing directory inside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path, PurePosixPath

from ..errors import BundleError, UsageError, WriteError
from ..testhooks import pause
from .check import check_files, check_manifest_integrity
from .manifest import MANIFEST, SCHEMA, SIGNATURE, load_manifest

# The marker file inside a staging (or .old) directory: {"tool", "pid", "created"} and, in an
# .old directory, "target" (the name of the OUT it was moved from) and "staging" (the name of
# the staging directory that was to replace it). Removed before the bundle
# is hashed and moved into place, so no bundle carries it.
STAGING_MARKER = ".qwen3vl-compile-staging.json"
_TOOL = "qwen3vl-compile"
_HANGUP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
_INTERRUPTS = (signal.SIGINT, *_HANGUP_SIGNALS)


def _is_within(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or lies below it (both resolved)."""
    return path == root or root in path.parents


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "the directory"), (stat.S_ISLNK, "the symbolic link"), (stat.S_ISFIFO, "the FIFO"),
                       (stat.S_ISSOCK, "the socket"), (stat.S_ISREG, "the file")):
        if test(mode):
            return name
    return "the device file"


def bundle_problem(path: Path) -> str | None:
    """Why the existing directory ``path`` is not a bundle that ``--force`` may replace, or
    None when it is one (or is empty). A bundle must pass the bundle check (``bundle/check.py``:
    schema and version, the manifest's own hash, every listed file's size and sha256) and hold
    nothing but its listed files, the manifest, and the directories those live in."""
    path = Path(path)
    entries = list(path.iterdir())
    if not entries:
        return None
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"it holds files and no {MANIFEST} (e.g. {entries[0].name!r})"
    try:
        claimed = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {MANIFEST} is not readable JSON"
    if not isinstance(claimed, dict) or claimed.get("schema") != SCHEMA:
        return f"its {MANIFEST} is not a qwen3vl-compile manifest"
    try:
        manifest = load_manifest(path)
        check_manifest_integrity(path, manifest)
    except BundleError as e:
        reason = str(e.args[0])
        return f"its {MANIFEST} fails the bundle check: {reason.replace(f'{manifest_file}: ', '')}"
    # load_manifest validated the manifest's shape (files, graphs): what is left is the disk.
    files = manifest["files"]
    problems = check_files(path, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"it does not match its {MANIFEST}: {problems[0]}{more}"
    listed = set(files) | {MANIFEST, SIGNATURE}  # the signature cannot be listed: it is made after the manifest
    folders = {p.as_posix() for rel in files for p in PurePosixPath(rel).parents if p.as_posix() != "."}
    for dirpath, dirnames, filenames in os.walk(path):  # does not follow symbolic links
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(path).as_posix()
            mode = os.lstat(p).st_mode
            if (stat.S_ISREG(mode) and rel in listed) or (stat.S_ISDIR(mode) and rel in folders):
                continue
            return f"it holds {_kind(mode)} {rel!r}, which the bundle's manifest does not list"
    return None


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C, SIGTERM and SIGHUP that arrive inside the block are held back and raised as
    KeyboardInterrupt when it ends. (A Python-level handler rather than a signal mask: a mask
    covers one thread only, and the kernel may hand the signal to any of torch's or ONNX
    Runtime's threads, after which Python would still interrupt the main thread.)"""
    caught: list[int] = []
    previous = {}
    try:
        for sig in _INTERRUPTS:
            try:
                previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
            except ValueError:  # not in the main thread: no KeyboardInterrupt can reach us here
                pass
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]}")


class BundleWriter:
    """``with BundleWriter(out, force=..., protected=[model_dir]) as staging: ...; writer.commit()``."""

    def __init__(self, out: Path, *, force: bool = False, protected: tuple[Path, ...] | list[Path] = (), log=None):
        self.requested = str(out)
        self.out = Path(os.path.abspath(os.path.expanduser(str(out) or "."))).resolve()
        self.force = force
        self.protected = [Path(p).resolve() for p in protected]
        self.staging: Path | None = None
        self._committed = False
        self._old: Path | None = None  # .OUT.old-* while it exists
        self._out_was_bundle = False  # OUT passed as a previous bundle of ours
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
            self._out_was_bundle = any(out.iterdir())
            if not self.force:
                raise UsageError(f"output {out} already exists; pass --force to replace it")
        parent = out.parent
        if not parent.is_dir():
            raise UsageError(f"output parent directory {parent} does not exist")

    def __enter__(self) -> Path:
        self.check_target()
        for what in remove_stale_staging(self.out.parent, log=self._log):
            self._log(f"removed {what}, left by an earlier compile that was killed")
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-{os.getpid()}-", dir=self.out.parent))
            _write_marker(self.staging)
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
        pause("commit")
        (self.staging / STAGING_MARKER).unlink(missing_ok=True)
        self.check_target()  # OUT may have been created or filled during the compile
        if os.path.lexists(self.out):
            try:
                self._old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-{os.getpid()}-", dir=self.out.parent))
                _write_marker(self._old, target=self.out.name, staging=self.staging.name)
            except OSError as e:
                raise WriteError(f"could not move the bundle into {self.out}: {e}; {self.out_now()}") from e
        pause("old-made")
        with _interrupts_held():  # the swap is one step for Ctrl-C, SIGTERM and SIGHUP
            try:
                if self._old is not None:
                    os.rename(self.out, self._old / "bundle")
                pause("swap")
                os.rename(self.staging, self.out)
            except OSError as e:
                self._roll_back()
                raise WriteError(f"could not move the bundle into {self.out}: {e}; {self.out_now()}") from e
            self._committed = True
        # Signals held back above are raised here: OUT holds the new bundle either way.
        pause("cleanup")
        self._remove_old()
        pause("committed")
        return self.out

    def _roll_back(self) -> None:
        """Before the commit: put the old bundle back at OUT if it was moved, then remove the
        .old directory, but only once it holds no bundle."""
        old = self._old
        if old is None:
            return
        if (old / "bundle").exists() and not os.path.lexists(self.out):
            try:
                os.rename(old / "bundle", self.out)
            except OSError:
                return  # out_now() says where the bundle is
        if not (old / "bundle").exists():
            shutil.rmtree(old, ignore_errors=True)
            if not old.exists():
                self._old = None

    def _remove_old(self) -> None:
        """After the commit (OUT holds the new bundle): delete the previous bundle's copy, its
        manifest first so that remains are never taken for a bundle, its marker last."""
        old = self._old
        if old is None:
            return
        copy = old / "bundle"
        if copy.exists():
            (copy / MANIFEST).unlink(missing_ok=True)
            pause("cleanup-mid")
            shutil.rmtree(copy, ignore_errors=True)
        if not copy.exists():
            shutil.rmtree(old, ignore_errors=True)
        if not old.exists():
            self._old = None

    def out_now(self) -> str:
        """What is at OUT now, in words, for messages after a failure or an interrupt."""
        out = self.out
        if self._committed:
            said = f"{out} holds the new bundle"
            if self._old is not None and self._old.exists():
                said += (f"; the previous bundle's remains in {self._old} are removed by the next compile into "
                         f"{out.parent} (or delete them)")
            return said
        if not os.path.lexists(out):
            if self._old is not None and (self._old / "bundle").exists():
                return f"{out} is missing; the previous bundle is in {self._old / 'bundle'}: move it back to {out}"
            return f"there is nothing at {out}"
        if out.is_dir() and not any(out.iterdir()):
            return f"{out} is still an empty directory"
        return f"{out} still holds the previous bundle" if self._out_was_bundle else f"{out} is as it was"

    def interrupted_message(self) -> str:
        if self._committed:
            return f"interrupted after the bundle was written: {self.out_now()}"
        return f"interrupted; nothing was written: {self.out_now()}"

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        if not self._committed:
            self._roll_back()
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)


def _write_marker(d: Path, **extra) -> None:
    (d / STAGING_MARKER).write_text(json.dumps({"tool": _TOOL, "pid": os.getpid(), "created": time.time(), **extra}))


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


def _old_target(d: Path, info: dict) -> Path:
    """The OUT an ``.OUT.old-PID-*`` directory was moved from."""
    name = info.get("target")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        name = d.name[1:].rpartition(".old-")[0]
    return d.parent / name


def remove_stale_staging(parent: Path, log=None) -> list[Path]:
    """Clean up after compiles into ``parent`` that were killed: directories that carry our
    marker and whose writer process is gone (or whose pid now belongs to a process that
    started after the directory was made). A staging directory is removed. An ``.old``
    directory is removed only when its ``OUT`` holds a bundle (the new one); when ``OUT`` is
    missing, the copy inside is the only one and is moved back to ``OUT``; otherwise it is
    left alone. Returns what was removed."""
    log = log or (lambda msg: None)
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
        copy = d / "bundle"
        if ".old-" in d.name and os.path.lexists(copy):
            target = _old_target(d, info)
            if not os.path.lexists(target):
                try:
                    os.rename(copy, target)
                except OSError as e:
                    log(f"left {d}: it holds the only copy of the bundle {target}, which could not be moved back ({e})")
                    continue
                log(f"moved the bundle in {copy} back to {target} (a compile replacing it was killed)")
                # That compile's new bundle, complete but never moved into place (its marker
                # is gone: it was removed just before the swap).
                staging = info.get("staging")
                if (isinstance(staging, str) and staging.startswith(f".{target.name}.staging-{pid}-") and "/" not in staging
                        and (parent / staging).is_dir() and not (parent / staging).is_symlink()):
                    shutil.rmtree(parent / staging, ignore_errors=True)
                    if not (parent / staging).exists():
                        removed.append(parent / staging)
            elif not target.is_dir() or bundle_problem(target) is not None or not any(target.iterdir()):
                log(f"left {d}: {target} does not hold a bundle, so {copy} may be the only copy of one")
                continue
            else:
                (copy / MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(copy, ignore_errors=True)
                if copy.exists():
                    continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed


def _raise_interrupt(signum, frame):  # pragma: no cover - exercised by signal tests
    raise KeyboardInterrupt(f"signal {signum}")
