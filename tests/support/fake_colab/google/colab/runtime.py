"""Stand-in for ``google.colab.runtime`` (see the package docstring): ``unassign()`` hands the VM back.

The real ``unassign()`` asks Colab's backend to end the session and raises
``google.colab.errors.RuntimeManagementError`` when it cannot. Here ``$FAKE_COLAB_UNASSIGN=fail`` raises it;
``ok`` only records the call (the process goes on, where Colab would take the VM away).
"""

from __future__ import annotations

from google.colab import behaviour, record
from google.colab.errors import RuntimeManagementError

__all__ = ["unassign"]


def unassign() -> None:
    """Instruct Colab to unassign the current runtime."""
    record("runtime.unassign")
    if behaviour("FAKE_COLAB_UNASSIGN") == "fail":
        raise RuntimeManagementError("Error communicating with the backend service: 503")
