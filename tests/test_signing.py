"""Signed bundles (the ``sign`` extra, OpenSSF model signing with an elliptic-curve key):
a sha256 anyone can recompute only catches accidents, a signature catches a deliberate
change too. Round trip on a copy of the shared text-only bundle: sign, verify, change one
byte of a weight file and rehash the manifest (the hash checks are fooled, the signature is
not), the wrong public key, and an unsigned bundle saying so."""

import base64
import importlib.util
import json
import sys

import pytest

from qwen3vl_compile.bundle.check import open_checked
from qwen3vl_compile.bundle.manifest import sha256_file, write_manifest
from qwen3vl_compile.bundle.signing import SIGNATURE, UNSIGNED
from qwen3vl_compile.cli import main as compile_main
from qwen3vl_compile.errors import BundleError

try:
    HAVE_SIGN = importlib.util.find_spec("model_signing") is not None and importlib.util.find_spec("OpenSSL") is not None
except (ImportError, ValueError):
    HAVE_SIGN = False
needs_sign = pytest.mark.skipif(not HAVE_SIGN, reason="the sign extra is not installed (pip install 'qwen3vl-compile[sign]')")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two EC P-256 key pairs as PEM files: ``{"a": (private, public), "b": (...)}``."""
    pytest.importorskip("cryptography", reason="cryptography comes with the sign extra")
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        k = ec.generate_private_key(ec.SECP256R1())
        priv, pub = d / f"{name}.pem", d / f"{name}.pub"
        priv.write_bytes(k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
        pub.write_bytes(k.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
        out[name] = (priv, pub)
    return out


def _cli(capsys, *argv):
    rc = compile_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def _weight_file(bundle) -> str:
    """The largest external-data file a graph reads (the decoder's weights)."""
    m = json.loads((bundle / "manifest.json").read_text())
    data = [f for g in m["graphs"].values() for f in g.get("data_files", [])] or list(m["files"])
    return max(data, key=lambda f: m["files"][f]["bytes"])


@needs_sign
def test_sign_verify_tamper_and_wrong_key(text_copy, keys, capsys):
    from qwen3vl_compile.runtime.pipeline import Pipeline

    (priv_a, pub_a), (_, pub_b) = keys["a"], keys["b"]
    rc, out, err = _cli(capsys, "sign", text_copy, "--key", priv_a)
    assert rc == 0, err
    assert (text_copy / SIGNATURE).is_file() and "integrity: signed" in out

    rc, out, err = _cli(capsys, "verify", text_copy, "--public-key", pub_a)
    assert rc == 0, out + err
    assert f"integrity: signed ({SIGNATURE}, verified with {pub_a}" in out.splitlines()[0]
    assert "UNKNOWN" not in out  # the signature is a known file, not a stray one
    rc, out, _ = _cli(capsys, "inspect", text_copy)
    assert rc == 0 and f"integrity: signed ({SIGNATURE}, key sha256 " in out
    Pipeline.load(text_copy, public_key=pub_a)

    # The wrong public key.
    rc, out, err = _cli(capsys, "verify", text_copy, "--public-key", pub_b)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"signature check failed: {SIGNATURE} was made with another key than {pub_b}" in err
    assert "files:" not in out  # nothing else was checked
    with pytest.raises(BundleError, match="another key"):
        Pipeline.load(text_copy, public_key=pub_b)

    # One byte of a weight file changed, and the manifest rehashed to match: the sha256
    # checks are fooled, the signature is not.
    weight = _weight_file(text_copy)
    path = text_copy / weight
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    m = json.loads((text_copy / "manifest.json").read_text())
    m["files"][weight]["sha256"] = sha256_file(path)
    write_manifest(text_copy, m)
    open_checked(text_copy)  # the hash checks pass
    rc, out, err = _cli(capsys, "verify", text_copy, "--public-key", pub_a)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "signature check failed: changed since signing: " in err
    assert weight in err and "manifest.json" in err
    with pytest.raises(BundleError, match="changed since signing"):
        Pipeline.load(text_copy, public_key=pub_a)

    # ... and the signed list edited to match too: the signature no longer verifies.
    sig = json.loads((text_copy / SIGNATURE).read_text())
    payload = json.loads(base64.b64decode(sig["dsseEnvelope"]["payload"]))
    for r in payload["predicate"]["resources"]:
        if r["name"] in (weight, "manifest.json"):
            r["digest"] = sha256_file(text_copy / r["name"])
    sig["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload, indent=2).encode()).decode()
    (text_copy / SIGNATURE).write_text(json.dumps(sig))
    rc, out, err = _cli(capsys, "verify", text_copy, "--public-key", pub_a)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"signature check failed: {SIGNATURE} does not verify with {pub_a} (InvalidSignature: its signed file list was altered" in err


@needs_sign
def test_added_file_breaks_the_signature_and_damaged_bundle_is_not_signed(text_copy, keys, capsys):
    priv, pub = keys["a"]
    (text_copy / "extra.txt").write_text("x")
    rc, _, err = _cli(capsys, "sign", text_copy, "--key", priv)
    assert rc == 1 and "extra.txt" in err and "does not list" in err and not (text_copy / SIGNATURE).exists()
    (text_copy / "extra.txt").unlink()
    assert _cli(capsys, "sign", text_copy, "--key", priv)[0] == 0
    (text_copy / "extra.txt").write_text("x")
    rc, _, err = _cli(capsys, "verify", text_copy, "--public-key", pub)
    assert rc == 1 and "not signed (added): extra.txt" in err, err


@needs_sign
def test_compile_with_sign_key(tmp_path, keys, capsys):
    from qwen3vl_compile.bundle.writer import bundle_problem

    priv, pub = keys["a"]
    out = tmp_path / "signed"
    rc, text, err = _cli(capsys, "--model", "tiny-random", "--graphs", "embedding", "--precision", "fp32",
                         "-o", out, "-q", "--sign-key", priv)
    assert rc == 0, err
    assert "(signed: model.sig)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signed"]  # no staging or temporary left
    assert (out / SIGNATURE).is_file() and not (out / ".qwen3vl-compile-staging.json").exists()
    rc, text, err = _cli(capsys, "verify", out, "--public-key", pub)
    assert rc == 0, text + err
    assert bundle_problem(out) is None  # --force may replace a signed bundle


@needs_sign
def test_bad_keys_are_one_line(text_copy, keys, capsys, tmp_path):
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("hello\n")
    rc, _, err = _cli(capsys, "sign", text_copy, "--key", not_a_key)
    assert rc == 2 and len(err.splitlines()) == 1 and "not an unencrypted PEM elliptic-curve private key" in err, err
    rc, _, err = _cli(capsys, "sign", text_copy, "--key", tmp_path / "absent.pem")
    assert rc == 2 and "cannot read it" in err, err
    assert _cli(capsys, "sign", text_copy, "--key", keys["a"][0])[0] == 0
    rc, _, err = _cli(capsys, "verify", text_copy, "--public-key", keys["a"][0])  # a private key as the public one
    assert rc == 2 and "not a PEM elliptic-curve public key" in err, err


def test_unsigned_bundle_says_so(text_bundle, capsys, tmp_path):
    rc, out, _ = _cli(capsys, "inspect", text_bundle)
    assert rc == 0 and UNSIGNED in out
    rc, out, err = _cli(capsys, "verify", text_bundle)
    assert rc == 0, err
    assert out.splitlines()[0] == UNSIGNED == "integrity: accidental changes only (unsigned)"
    if HAVE_SIGN:
        pub = tmp_path / "k.pub"
        pub.write_text("unused\n")
        rc, out, err = _cli(capsys, "verify", text_bundle, "--public-key", pub)
        assert rc == 1 and len(err.splitlines()) == 1 and "not signed (no model.sig)" in err, err


def test_without_the_extra_one_line_and_exit_2(text_bundle, tmp_path, capsys, monkeypatch):
    """model-signing missing (simulated: an import of it fails): --sign-key, sign and
    --public-key each say how to install it, before any work."""
    for name in [m for m in sys.modules if m == "model_signing" or m.startswith("model_signing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "model_signing", None)  # `import model_signing` now raises ImportError
    key = tmp_path / "key.pem"
    key.write_text("unused\n")
    out = tmp_path / "out"
    for argv in (["--model", "tiny-random", "--graphs", "embedding", "-o", out, "-q", "--sign-key", key],
                 ["sign", text_bundle, "--key", key],
                 ["verify", text_bundle, "--public-key", key]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert "needs the model-signing package" in err and "pip install 'qwen3vl-compile[sign]'" in err, err
    assert not out.exists()
    assert not (text_bundle / SIGNATURE).exists()
