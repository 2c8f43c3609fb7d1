"""Issue 23: a --force replace is all-or-nothing from the user's view, whatever step a real
signal lands on. A real compile process (``python -m qwen3vl_compile.cli``, the console
script's path) replaces a real bundle and is paused at each step of the replace with the
test-only hook ``QWEN3VL_COMPILE_TEST_PAUSE=STEP:FILE`` (``qwen3vl_compile/testhooks.py``);
the test sends the signal there and lets it go on. Afterwards ``OUT`` is the complete old
bundle or the complete new one (manifest integrity and every file's hash), the printed line
says which, and no ``.old`` copy that is the only one is ever removed.

Each case is one small compile (the embedding graph, no parity): a few seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen3vl_compile.bundle.check import open_checked
from qwen3vl_compile.bundle.writer import remove_stale_staging
from qwen3vl_compile.testhooks import ENV

# step -> what OUT holds after an interrupt there
STEPS = {
    "commit": "old",       # staging complete, nothing moved yet
    "old-made": "old",     # .OUT.old-* made, OUT not moved yet
    "swap": "new",         # between the two renames: the signal is held back until both are done
    "cleanup": "new",      # swapped, the old copy not yet deleted
    "cleanup-mid": "new",  # the old copy half deleted
    "committed": "new",    # commit() done, the summary not printed yet
    "atexit": "new",       # main returned: interpreter shutdown
}


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory):
    from qwen3vl_compile.cli import main

    out = tmp_path_factory.mktemp("old") / "bundle"
    assert main(["--model", "tiny-random", "--graphs", "embedding", "--no-verify", "-o", str(out), "-q"]) == 0
    return out, open_checked(out)["manifest_sha256"]


def _start(out: Path, step: str, flag: Path) -> subprocess.Popen:
    env = {**os.environ, ENV: f"{step}:{flag}"}
    cmd = [sys.executable, "-m", "qwen3vl_compile.cli", "--model", "tiny-random", "--graphs", "embedding",
           "--no-verify", "-o", str(out), "--force", "-q"]
    # SIGINT as a terminal's Ctrl-C finds it: a test run started in the background by a
    # shell without job control inherits SIGINT ignored, and Python then keeps it ignored.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _pause_then_signal(p: subprocess.Popen, flag: Path, sig: int) -> tuple[int, str, str]:
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the compile never reached the step"
        time.sleep(0.02)
    p.send_signal(sig)
    time.sleep(0.3)  # where the signal is not held back, it has landed by now
    flag.unlink(missing_ok=True)  # go on
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


def _holds(out: Path, old_sha: str) -> str:
    manifest = open_checked(out)  # complete: manifest integrity and every file's hash
    return "old" if manifest["manifest_sha256"] == old_sha else "new"


# Ctrl-C at every step; SIGTERM (kill) and SIGHUP (a closed terminal) where the swap starts and
# in its middle, where they are held back like Ctrl-C.
CASES = [(step, signal.SIGINT) for step in STEPS] + [("swap", signal.SIGTERM), ("old-made", signal.SIGHUP)]


# The fast tier keeps the case that matters most (Ctrl-C in the middle of the swap).
PARAMS = [pytest.param(step, sig, id=f"{step}-{signal.Signals(sig).name}",
                       marks=() if (step, sig) == ("swap", signal.SIGINT) else pytest.mark.slow)
          for step, sig in CASES]


@pytest.mark.parametrize("step,sig", PARAMS)
def test_a_signal_at_each_step_of_a_replace(tmp_path, old_bundle, step, sig):
    src, old_sha = old_bundle
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "OUT"
    shutil.copytree(src, out)
    rc, stdout, stderr = _pause_then_signal(_start(out, step, tmp_path / "paused"), tmp_path / "paused", sig)

    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    holds = _holds(out, old_sha)
    assert holds == STEPS[step], (step, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    if step == "atexit":  # the compile had finished and said so: Ctrl-C at exit is ignored
        assert rc == 0 and lines == [] and stdout.startswith(f"wrote {out}"), (rc, stderr)
    else:
        assert rc == 130 and len(lines) == 1, (rc, stderr)
        line = lines[0]
        assert line.startswith("qwen3vl-compile: interrupted"), line
        if holds == "old":
            assert line == f"qwen3vl-compile: interrupted; nothing was written: {out} still holds the previous bundle"
        else:
            assert line.startswith(f"qwen3vl-compile: interrupted after the bundle was written: {out} holds the new bundle")
            assert "nothing was written" not in line
    left = sorted(p.name for p in parent.iterdir() if p.name != "OUT")
    if holds == "old" or step in ("committed", "atexit"):
        assert left == [], left  # no staging directory, no .old directory
    else:
        # The old copy's remains (if any) are named in the line; the next compile removes them.
        assert all(".OUT.old-" in name for name in left), left
        for name in left:
            assert str(parent / name) in stderr
        assert sorted(remove_stale_staging(parent)) == sorted(parent / name for name in left)
        assert [p.name for p in parent.iterdir()] == ["OUT"] and _holds(out, old_sha) == "new"


@pytest.mark.slow
def test_a_compile_killed_between_the_renames_loses_nothing(tmp_path, old_bundle):
    """SIGKILL cannot be held back: between the two renames OUT is missing and the old bundle
    is only in .OUT.old-*/bundle. The next compile into the parent moves it back, never
    deletes it (before issue 23 it was deleted as 'left by an earlier compile that was killed')."""
    src, old_sha = old_bundle
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "OUT"
    shutil.copytree(src, out)
    p = _start(out, "swap", tmp_path / "paused")
    rc, _, _ = _pause_then_signal(p, tmp_path / "paused", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not out.exists()
    olds = [d for d in parent.iterdir() if ".OUT.old-" in d.name]
    assert len(olds) == 1 and (olds[0] / "bundle" / "manifest.json").is_file()
    from qwen3vl_compile.cli import main

    # The next compile into the same parent: it puts the old bundle back (and removes the
    # killed compile's never-committed staging directory), then refuses to replace it without --force.
    assert main(["--model", "tiny-random", "--graphs", "embedding", "-o", str(out), "-q"]) == 2
    assert _holds(out, old_sha) == "old"
    assert [d.name for d in parent.iterdir()] == ["OUT"]
