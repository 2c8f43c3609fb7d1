"""Reading a JSON object file in one line of error: shared by the checkpoint reader
(``model/``), the bundle reader (``bundle/``) and the CLI, below all of them."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BundleError


def read_json_object(path: Path, error: type[Exception] = BundleError, what: str = "") -> dict:
    """A JSON file that must hold an object (a config, a manifest): its dict, or ``error``
    in one line for an unreadable file, bad JSON or another JSON type."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object{what}")
    return value
