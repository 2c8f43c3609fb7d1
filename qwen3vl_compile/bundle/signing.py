"""Signing a bundle, so that a deliberate change is caught too, not only an accident.

``manifest.json`` records every file's sha256 and a hash of itself, but anyone who edits a
file can recompute both. A signature made with a private key cannot be remade without it.

We use OpenSSF model signing (the ``model-signing`` package, the ``sign`` extra) in its
offline, key-based mode: an elliptic-curve private key in a PEM file (P-256, P-384 or
P-521) signs, its public key verifies. The signature is ``model.sig`` at the top of the
bundle, a Sigstore bundle (JSON) whose signed payload lists the sha256 of every other file
of the bundle, ``manifest.json`` included. The manifest cannot list the signature (the
signature is made after it), so ``model.sig`` is the one file a bundle may hold that its
manifest does not list. A signature also catches a file added to the bundle.

The package is imported only when signing or verifying: the slim runtime runs without it,
and ``inspect`` reports whether a bundle is signed without it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from pathlib import Path

from ..errors import BundleError, UsageError
from .manifest import SIGNATURE, sha256_file

INSTALL_HINT = "pip install 'qwen3vl-compile[sign]'"
UNSIGNED = "integrity: accidental changes only (unsigned)"


def _library(what: str):
    """``(hashing, signing, verifying)`` of model_signing, or a one-line UsageError (exit 2)."""
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as e:
        missing = f" ({e.name} is not installed)" if getattr(e, "name", None) else ""
        raise UsageError(f"{what} needs the model-signing package{missing}: {INSTALL_HINT}") from None
    return hashing, signing, verifying


def _hashing_config(hashing):
    # Every file but the signature itself, .git* names included (model_signing skips those by
    # default), so nothing in the directory escapes the signature.
    return hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False).set_ignored_paths(
        paths=[SIGNATURE], ignore_git_paths=False)


def key_id(root: Path) -> str | None:
    """The signing key's id recorded in ``model.sig`` (sha256 of the public key's PEM, as
    ``sha256sum key.pub`` prints it), or None when unreadable. Needs no model_signing."""
    try:
        hint = json.loads((Path(root) / SIGNATURE).read_text())["verificationMaterial"]["publicKey"]["hint"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return hint if isinstance(hint, str) and hint else None


def integrity_line(root: Path) -> str:
    """What ``inspect`` (and ``verify`` without ``--public-key``) says about authenticity."""
    if not (Path(root) / SIGNATURE).is_file():
        return UNSIGNED
    kid = key_id(root)
    who = f"key sha256 {kid[:16]}" if kid else "signing key unknown"
    return f"integrity: signed ({SIGNATURE}, {who}; not checked here: verify --public-key PUB checks it)"


def _signer(private_key):
    """``(hashing module, signing Config)`` for the key, or a one-line UsageError (exit 2)."""
    hashing, signing, _ = _library("signing (--sign-key / sign --key)")
    key = Path(private_key).expanduser()
    try:
        return hashing, signing.Config().use_elliptic_key_signer(private_key=key)
    except OSError as e:
        raise UsageError(f"signing key {key}: cannot read it ({e.strerror or e})") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"signing key {key}: not an unencrypted PEM elliptic-curve private key "
                         f"(P-256, P-384 or P-521): {_first_line(str(e))}") from None


def check_signing_key(private_key) -> None:
    """Fail now (before a compile's expensive work) when the key or the package is unusable."""
    _signer(private_key)


def sign(bundle_dir, private_key, *, check: bool = True) -> Path:
    """Sign the bundle at ``bundle_dir`` with the PEM elliptic-curve ``private_key``; write
    (or replace) ``bundle_dir/model.sig`` and return its path.

    With ``check`` (the default) the bundle is checked first (manifest, sizes, sha256, no
    unlisted file): a signature vouches for what is there, so a damaged bundle is refused.
    """
    root = Path(bundle_dir)
    hashing, config = _signer(private_key)
    if check:
        from .check import open_checked, unknown_files

        manifest = open_checked(root)
        extra = unknown_files(root, manifest)
        if extra:
            raise BundleError(f"{root}: holds file(s) its manifest does not list ({', '.join(extra)}); "
                              "not signing what the compiler did not write")
    config.set_hashing_config(_hashing_config(hashing))
    # Written next to the bundle, then renamed in: a failed signing leaves the old signature
    # (or none), and the temporary file is never inside the directory being hashed.
    fd, tmp = tempfile.mkstemp(prefix=f".{root.name}.sig-", dir=root.resolve().parent)
    os.close(fd)
    try:
        config.sign(root, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, root / SIGNATURE)
    except OSError as e:
        raise BundleError(f"{root}: could not write {SIGNATURE}: {e.strerror or e}") from None
    except ValueError as e:  # a symlink in the bundle, say
        raise BundleError(f"{root}: cannot sign: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return root / SIGNATURE


def verify(bundle_dir, public_key) -> str:
    """Check ``model.sig`` against the bundle's files with the PEM ``public_key``. Returns the
    ``integrity: signed (...)`` line; raises BundleError (one line) when the bundle is not
    signed, was signed with another key, or any file differs from what was signed."""
    root = Path(bundle_dir)
    pub = Path(public_key).expanduser()
    hashing, _, verifying = _library("--public-key")
    sig = root / SIGNATURE
    if not sig.is_file():
        raise BundleError(f"{root}: not signed (no {SIGNATURE}), so --public-key cannot vouch for it; "
                          f"{UNSIGNED.split(': ', 1)[1]}")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=pub)
    except OSError as e:
        raise UsageError(f"public key {pub}: cannot read it ({e.strerror or e})") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"public key {pub}: not a PEM elliptic-curve public key (P-256, P-384 or P-521): {e}") from None
    config.set_hashing_config(_hashing_config(hashing))
    try:
        config.verify(root, sig)
    except ValueError as e:
        text = str(e)
        if text.startswith("Key mismatch"):
            raise BundleError(f"{root}: signature check failed: {SIGNATURE} was made with another key than {pub}") from None
        if text.startswith("Signature mismatch"):
            raise BundleError(f"{root}: signature check failed: {_changes(root)}") from None
        raise BundleError(f"{root}: signature check failed: {SIGNATURE} is invalid ({_first_line(text)})") from None
    except Exception as e:  # cryptography's InvalidSignature (forged or damaged), a malformed file
        what = type(e).__name__ + (f": {_first_line(str(e))}" if str(e) else "")
        if type(e).__name__ == "InvalidSignature":
            what = "InvalidSignature: its signed file list was altered, or it is damaged"
        raise BundleError(f"{root}: signature check failed: {SIGNATURE} does not verify with {pub} ({what})") from None
    kid = key_id(root)
    return f"integrity: signed ({SIGNATURE}, verified with {pub}" + (f", key sha256 {kid[:16]}" if kid else "") + ")"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else text)[:300]


def _changes(root: Path) -> str:
    """Which files differ from the signed list (after the signature itself checked out)."""
    try:
        envelope = json.loads((root / SIGNATURE).read_text())["dsseEnvelope"]
        payload = json.loads(base64.b64decode(envelope["payload"]))
        signed = {r["name"]: r["digest"] for r in payload["predicate"]["resources"]}
    except (OSError, ValueError, KeyError, TypeError, binascii.Error):
        return "the bundle's files differ from what was signed"
    current = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
               if p.is_file() and p.relative_to(root).as_posix() != SIGNATURE}
    changed = [n for n in sorted(set(signed) & set(current)) if sha256_file(current[n]) != signed[n]]
    parts = []
    for label, names in (("changed since signing", changed),
                         ("not signed (added)", sorted(set(current) - set(signed))),
                         ("missing", sorted(set(signed) - set(current)))):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts) or "the bundle's files differ from what was signed"
