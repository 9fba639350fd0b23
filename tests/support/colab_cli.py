"""``runner`` as a Colab VM runs it, with Drive's mount point moved into a test's folder.

Colab mounts Drive at ``/content/drive``, a folder tests must not touch. This entry point points runner's
``DRIVE_MOUNT_POINT`` (and so the Colab default queue under it) at ``$FAKE_COLAB_MOUNT_POINT``, the same
variable the stand-in ``google.colab.drive`` unmounts, then runs the real ``runner`` command::

    python -m tests.support.colab_cli work --release-runtime ...
"""

from __future__ import annotations

import os
import sys

from runner import defaults


def main() -> int:
    mount_point = os.environ["FAKE_COLAB_MOUNT_POINT"]
    defaults.DRIVE_MOUNT_POINT = mount_point
    defaults.QUEUE_DIR_COLAB = f"{mount_point}/MyDrive/runner"
    from runner.cli import main as runner_main  # after the defaults are moved

    return runner_main()


if __name__ == "__main__":
    sys.exit(main())
