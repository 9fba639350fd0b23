"""Rewrite one file forever with runner.storage's atomic writes, each version a self-checking payload.

Run as ``python storage_rewriter.py PATH``; the storage tests SIGKILL it at random moments and check that PATH is
always absent or one complete version. Versions alternate between the two writers:

* ``atomic_write_json``: ``{"version": n, "body": "<hex>", "sha256": "<sha256 of body>"}``
* ``atomic_write_bytes``: ``b"BIN <n> <len> <sha256>\\n" + body``

Each run continues from the version it finds, so versions on disk must never go backwards across kills.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

from runner.storage import atomic_write_bytes, atomic_write_json

MAX_BODY = 300_000


def parse(data: bytes) -> int:
    """The version of a complete payload; ``ValueError`` (or ``AssertionError``) for anything partial."""
    if data.startswith(b"BIN "):
        header, newline, body = data.partition(b"\n")
        tag, version, length, digest = header.decode("ascii").split(" ")
        if not newline or len(body) != int(length) or hashlib.sha256(body).hexdigest() != digest:
            raise ValueError(f"binary version {version} is incomplete: {len(body)} of {length} bytes")
        return int(version)
    record = json.loads(data.decode("utf-8"))
    body = record["body"].encode("ascii")
    if hashlib.sha256(body).hexdigest() != record["sha256"]:
        raise ValueError(f"json version {record['version']} does not match its sha256")
    return int(record["version"])


def main(path: Path) -> None:
    version = parse(path.read_bytes()) if path.exists() else 0
    rng = random.Random(os.getpid())
    print("ready", flush=True)
    while True:
        version += 1
        body = rng.randbytes(rng.randrange(0, MAX_BODY))
        if version % 2:
            header = f"BIN {version} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode("ascii")
            atomic_write_bytes(path, header + body)
        else:
            text = body.hex()[: len(body)]
            digest = hashlib.sha256(text.encode("ascii")).hexdigest()
            atomic_write_json(path, {"version": version, "body": text, "sha256": digest})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
