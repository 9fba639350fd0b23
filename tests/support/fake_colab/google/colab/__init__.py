"""Stand-in for Colab's ``google.colab`` package, which exists only on a Colab VM.

It is put on the import path (``tests/support/fake_colab``) by the tests that model a Colab runtime. Only the
parts runner calls are here, with the real signatures: ``drive.mount(mountpoint, force_remount=False,
timeout_ms=120000, readonly=False)``, ``drive.flush_and_unmount(timeout_ms=86400000)`` and
``runtime.unassign()`` (which raises ``google.colab.errors.RuntimeManagementError`` when the backend refuses).

There is deliberately no ``tests/support/fake_colab/google/__init__.py``: ``google`` is a namespace package
shared with protobuf, and an ``__init__`` there would hide ``google.protobuf`` (and break TensorFlow).

Every call is appended as one JSON line (``{"call": "drive.mount", "args": {...}}``) to the file named by
``$FAKE_COLAB_LOG`` (when set), and each call behaves as the environment says:

``$FAKE_COLAB_MOUNT``       ok (default) | refuse (ValueError) | timeout (ValueError, as Colab words it) |
                            timeout-error (TimeoutError) | empty (reports success, but no MyDrive appears)
``$FAKE_COLAB_FLUSH``       ok (default) | fail
``$FAKE_COLAB_UNASSIGN``    ok (default) | fail
``$FAKE_COLAB_MOUNT_POINT`` where Drive is mounted, for ``flush_and_unmount`` (the real one remembers it;
                            default ``/content/drive``)
"""

from __future__ import annotations

import json
import os
from typing import Any


def record(call: str, **args: Any) -> None:
    """Append one call to ``$FAKE_COLAB_LOG``."""
    path = os.environ.get("FAKE_COLAB_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"call": call, "args": args}) + "\n")


def behaviour(variable: str) -> str:
    """What the environment asks of one call (``ok`` unless said otherwise)."""
    return os.environ.get(variable, "ok")
