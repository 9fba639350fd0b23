"""What a warm-started child sees: tests/test_warm_start.py runs it as ``python -m tests.support.warm_probe``."""

import atexit
import json
import os
import random
import sys
import time

preloaded = "keras" in sys.modules  # before this module imports anything of its own
atexit.register(lambda: print("atexit ran", flush=True))
action = sys.argv[1]
print(
    json.dumps(
        {
            "argv": sys.argv[1:],
            "cwd": os.getcwd(),
            "probe": os.environ.get("PROBE"),
            "group_leader": os.getpgid(0) == os.getpid(),
            "preloaded": preloaded,
            "draw": random.random(),
        }
    ),
    flush=True,
)
print("to stderr", file=sys.stderr, flush=True)
if action == "exit":
    sys.exit(int(sys.argv[2]))
if action == "raise":
    raise ValueError("raised in the probe")
if action == "sleep":
    time.sleep(float(sys.argv[2]))
