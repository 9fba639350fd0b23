"""Make the mistakes users make, with real commands on real files, and print what each one got.

    python scripts/everyday_mistakes.py            # a table: mistake, exit code, lines printed, what was said
    python scripts/everyday_mistakes.py --json out.json

Each mistake is a real ``runner`` process (the real Keras trainer where a job runs) in a fresh temporary folder. A
mistake passes when the command exits with the expected code, prints no traceback, says one line (the `error:` line
of a refusal, or one line for each failed job), and leaves the queue folder as it was when it must refuse. The
script exits 1 when any mistake did not pass. It needs no network: URLs point at a server it starts on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.data_server import serve  # noqa: E402 (the tests' own server on 127.0.0.1)

DIGITS = REPO / "runner" / "datasets" / "digits.tar.gz"


@dataclass
class Outcome:
    mistake: str
    command: str
    expected: int
    code: int
    lines: int
    said: str
    seconds: float
    unchanged: bool | None
    passed: bool
    errors: list[str]


def spec(name: str, source: str, **overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": name,
        "dataset": {
            "source": source,
            "train": "digits/train",
            "validation": "digits/validation",
            "image_size": [16, 16],
            "color_mode": "grayscale",
            "label_mode": "int",
            "batch_size": 64,
        },
        "model": {"builtin": "simple_cnn", "params": {"filters": 4, "dense": 16}},
        "training": {"epochs": 1, "loss": "sparse_categorical_crossentropy"},
    }
    for key, value in overrides.items():
        section = data.get(key)
        data[key] = {**section, **value} if isinstance(section, dict) and isinstance(value, dict) else value
    return data


def tree_digest(folder: Path) -> str:
    """Every file's path and content under ``folder``, hashed (leases and logs included)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")) if folder.exists() else []:
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Session:
    """A user's folder: a queue, spec files, and the commands they type."""

    def __init__(self, root: Path) -> None:
        self.root, self.queue = root, root / "queue"
        self.env = {
            **os.environ,
            "RUNNER_CACHE": str(root / "cache"),
            "RUNNER_RETRY_BUDGET": "20",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(REPO),
        }
        self.env.pop("RUNNER_QUEUE", None)
        self.outcomes: list[Outcome] = []

    def write(self, name: str, data: dict[str, object] | str) -> Path:
        path = self.root / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path

    def run(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, head: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``runner ARGS``; with ``head``, read one line of its output and close the pipe, as ``| head -1``."""
        command = [sys.executable, "-m", "runner", *args]
        where = {"cwd": cwd or self.root, "env": {**self.env, **(env or {})}}
        if not head:
            return subprocess.run(command, capture_output=True, text=True, timeout=600, **where)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **where)
        first = process.stdout.readline()  # type: ignore[union-attr]
        process.stdout.close()  # type: ignore[union-attr]
        stderr = process.stderr.read()  # type: ignore[union-attr]
        return subprocess.CompletedProcess(command, process.wait(timeout=60), first, stderr)

    def mistake(
        self,
        what: str,
        args: list[str],
        *,
        expected: int,
        lines: int = 1,
        refuses: bool = True,
        check: Callable[[subprocess.CompletedProcess], bool] = lambda _: True,
        **options: object,
    ) -> None:
        before = tree_digest(self.queue)
        started = time.monotonic()
        done = self.run(*args, **options)  # type: ignore[arg-type]
        seconds = time.monotonic() - started
        said = [
            line
            for line in done.stderr.splitlines()
            if line.strip() and not line.startswith(("storage error", "downloading "))
        ]
        errors = [line for line in said if line.startswith("error:") or " failed: " in line]
        unchanged = tree_digest(self.queue) == before if refuses else None
        passed = (
            done.returncode == expected
            and "Traceback" not in done.stderr + done.stdout
            and (len(errors) == lines if expected != 0 else True)
            and unchanged is not False
            and check(done)
        )
        output = done.stdout.strip().splitlines()
        shown = errors[0] if errors else said[-1] if said else output[0] if output else ""
        self.outcomes.append(
            Outcome(
                what,
                "runner " + " ".join(args),
                expected,
                done.returncode,
                len(errors),
                shown,
                seconds,
                unchanged,
                passed,
                errors,
            )
        )


def run_all(root: Path) -> list[Outcome]:
    user = Session(root)
    shutil.copy(DIGITS, root / "digits.tar.gz")
    archive = str(root / "digits.tar.gz")
    good = user.write("good.json", spec("good", archive))
    q = ["--queue", str(user.queue)]

    # --- before any job: the wrong folder, a wrong file -------------------------------------------------------------
    user.mistake("status on a queue folder that does not exist", ["status", *q], expected=1)
    user.mistake("status from another folder, without --queue", ["status"], expected=1, cwd=Path(tempfile.gettempdir()))
    user.mistake("work on a queue folder that does not exist", ["work", *q], expected=1)
    user.mistake("submit a spec file that does not exist", ["submit", *q, "nope.yaml"], expected=2)
    bad_specs = {
        "submit a spec with a typo in a field": ("typo.yaml", "name: t\ndataset: {source: x}\ntrainig: {epochs: 3}\n"),
        "submit epochs written as a word": ("word.yaml", "name: w\ndataset: {source: x}\ntraining: {epochs: ten}\n"),
        "submit a name with spaces and capitals": ("name.yaml", "name: My Job\ndataset: {source: x}\n"),
        "submit YAML that does not parse": ("tab.yaml", "name: t\n\tdataset: x\n"),
    }
    for what, (file_name, text) in bad_specs.items():
        user.mistake(what, ["submit", *q, str(user.write(file_name, text))], expected=2)
    user.mistake(
        "learning_rate: 1e-3 (YAML 1.1 reads a string)",
        [
            "submit",
            *q,
            str(
                user.write(
                    "rate.yaml",
                    f"name: rate\ndataset: {{source: {archive}, train: digits/train, label_mode: int, image_size: [16, 16]}}\n"
                    "model: {builtin: simple_cnn, params: {filters: 4, dense: 16}}\n"
                    "training: {learning_rate: 1e-3, loss: sparse_categorical_crossentropy}\n",
                )
            ),
        ],
        expected=0,
        refuses=False,
    )
    user.mistake("submit the good job", ["submit", *q, str(good)], expected=0, refuses=False)
    user.mistake(
        "submit another spec under a name in use",
        ["submit", *q, str(user.write("good2.json", spec("good", archive, training={"epochs": 2})))],
        expected=2,
    )
    user.mistake("cancel a job that does not exist", ["cancel", "nope", *q], expected=2)
    user.mistake("retry a job that is queued", ["retry", "good", *q], expected=1)
    user.mistake("logs of a job that does not exist", ["logs", "nope", *q], expected=2)
    user.mistake("predict with a job that is not done", ["predict", "good", str(root), *q], expected=1)
    user.mistake(
        "a loss that does not fit the labels",
        ["submit", *q, str(user.write("loss.json", spec("loss", archive, training={"loss": "binary_crossentropy"})))],
        expected=2,
    )
    user.mistake("--max-hours 0", ["work", "--max-hours", "0", *q], expected=2)
    user.mistake(
        "--max-hours abc",
        ["work", "--max-hours", "abc", *q],
        expected=2,
        lines=0,
        check=lambda done: "invalid float value" in done.stderr,
    )
    user.mistake(
        "a lease duration that is not a number", ["work", *q], expected=2, env={"RUNNER_LEASE_DURATION": "abc"}
    )
    user.mistake(
        "edit with a spec of another name",
        ["edit", "good", str(user.write("other.json", spec("other", archive))), *q],
        expected=2,
    )
    user.mistake("delete a job that does not exist", ["delete", "nope", "--yes", *q], expected=2)
    user.mistake("plot a job that does not exist", ["plot", "nope", *q], expected=2)

    # --- jobs that fail when they run: one line each, the others go on -----------------------------------------------
    with serve({"/digits.tar.gz": (root / "digits.tar.gz").read_bytes()}) as server:
        base = server.base_url
        failing = {
            "missing-source": spec("missing-source", str(root / "no-such.zip")),
            "wrong-train-folder": spec("wrong-train-folder", archive, dataset={"train": "train"}),
            "binary-ten-classes": spec(
                "binary-ten-classes", archive, dataset={"label_mode": "binary"}, training={"loss": "binary_crossentropy"}
            ),
            "missing-factory": spec("missing-factory", archive, model={"builtin": None, "factory": "nowhere:build"}),
            "url-404": spec("url-404", f"{base}/gone.zip"),
            "url-refused": spec("url-refused", f"http://127.0.0.1:{closed_port()}/digits.tar.gz"),
            "bad-sha256": spec("bad-sha256", f"{base}/digits.tar.gz", dataset={"sha256": "0" * 64}),
        }
        for name, data in failing.items():
            user.run("submit", *q, str(user.write(f"{name}.json", data)))
        user.mistake(
            "seven jobs broken at run time and two good ones, in one work", ["work", *q], expected=1, lines=len(failing), refuses=False
        )

    # --- after the work ----------------------------------------------------------------------------------------------
    user.mistake(
        "edit a done job",
        ["edit", "good", str(user.write("good3.json", spec("good", archive, training={"epochs": 3}))), *q],
        expected=1,
    )
    user.mistake("predict on a file that does not exist", ["predict", "good", "nope.png", *q], expected=2)
    user.mistake(
        "predict on a file that is not an image",
        ["predict", "good", str(user.write("notes.txt", "hello")), *q],
        expected=2,
    )
    user.mistake("retry a done job", ["retry", "good", *q], expected=1)
    user.mistake("cancel a done job", ["cancel", "good", *q], expected=1)
    user.mistake(
        "status piped into head -1",
        ["status", *q],
        expected=0,
        refuses=False,
        check=lambda done: done.stdout.startswith("queue ") and done.stderr == "",
        head=True,
    )
    user.mistake(
        "fix a failed job's spec with edit",
        ["edit", "wrong-train-folder", str(user.write("fixed.json", spec("wrong-train-folder", archive))), *q],
        expected=0,
        refuses=False,
        lines=0,
    )
    return user.outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the outcomes as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="runner-mistakes-") as scratch:
        outcomes = run_all(Path(scratch))
    for number, outcome in enumerate(outcomes, 1):
        mark = "ok " if outcome.passed else "BAD"
        print(
            f"{mark} {number:2d}. {outcome.mistake} -> exit {outcome.code} (expected {outcome.expected}), "
            f"{outcome.lines} error line(s), {outcome.seconds:.1f}s: {outcome.said}"
        )
    passed = sum(outcome.passed for outcome in outcomes)
    print(f"{passed} of {len(outcomes)} mistakes handled as they should be")
    if args.json:
        args.json.write_text(json.dumps([asdict(outcome) for outcome in outcomes], indent=2))
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
