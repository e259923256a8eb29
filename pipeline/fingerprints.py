"""Content hashes naming what a unit, set or cell was built from (the job runner's and the
evaluation's caches)."""

from __future__ import annotations

import hashlib
import json


def fingerprint(*parts, length: int = 16) -> str:
    """Content hash of ``parts`` (JSON, keys sorted): what a unit or cell was built from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]
