"""The ``runner`` command. Errors are one line and an exit code, never a traceback.

argparse rather than a CLI framework: the commands are few, it adds no dependency, starts fast (``runner
status`` must stay quick where TensorFlow is slow to import), and its usage errors already exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from runner import defaults, storage
from runner.api import open_queue
from runner.checkpoints import CheckpointStore
from runner.console import queue_failing, render_status, status_records, watch_status
from runner.edit import delete_job, replace_spec, shapes_checkpoints, spec_changes
from runner.errors import JobExists, LeaseHeld, RunnerError, SpecError, StorageError, UsageError
from runner.images import first_bytes, is_image
from runner.queue import Queue
from runner.session import SessionOptions, run_session
from runner.spec import JobSpec, json_schema, load_spec
from runner.words import counted

TF_VERBOSE_ENV = "RUNNER_TF_VERBOSE"
"""What ``--verbose`` sets: ``runner.train`` then lets TensorFlow's start-up messages through (it is not imported
here: that would load TensorFlow for every command)."""

DEBUG_ENV = "RUNNER_DEBUG"
"""Set to 1 to see the traceback of an unexpected error."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--queue",
        metavar="DIR",
        type=Path,
        help=f"queue folder (default: ${defaults.QUEUE_ENV}, Drive on Colab, else ./{defaults.QUEUE_DIR_LOCAL})",
    )
    parser = argparse.ArgumentParser(
        prog="runner", description="Resumable Keras training jobs for sessions that die without warning."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", parents=[common], help="validate job specs and add them to the queue")
    submit.add_argument("specs", nargs="+", metavar="SPEC", type=Path, help="YAML or JSON job spec")
    submit.add_argument(
        "--replace",
        action="store_true",
        help="replace the spec of a job of that name that is not running or done (as `runner edit` does)",
    )

    edit = commands.add_parser(
        "edit", parents=[common], help="replace the spec of a queued, failed or cancelled job, keeping what still fits"
    )
    edit.add_argument("name", metavar="NAME")
    edit.add_argument("spec", metavar="SPEC", type=Path, help="the new YAML or JSON job spec (same name)")
    edit.add_argument(
        "-y", "--yes", action="store_true", help="do not ask on a terminal before discarding checkpoints"
    )

    delete = commands.add_parser("delete", parents=[common], help="remove a job that no worker runs from the queue")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep its checkpoints and exported models in <queue>/deleted/",
    )
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation on a terminal")

    work = commands.add_parser("work", parents=[common], help="run every runnable job, resuming each")
    work.add_argument("--job", metavar="NAME", help="run only this job")
    work.add_argument("--verbose", action="store_true", help="show TensorFlow's and Keras' start-up messages too")
    work.add_argument(
        "--max-hours",
        metavar="H",
        type=float,
        help="stop with a saved checkpoint after H hours (default on Colab: a little before the 12-hour cap)",
    )
    work.add_argument(
        "--refresh-data",
        action="store_true",
        help="fetch the datasets of the jobs it runs again, instead of using their local copies",
    )
    work.add_argument(
        "--flush", action="store_true", help="on Colab, push Drive's pending writes at the end (unmounts Drive)"
    )
    work.add_argument(
        "--release-runtime",
        action="store_true",
        help="on Colab, flush Drive and hand the runtime back when the work ends, so no compute units are spent idle",
    )

    status = commands.add_parser("status", parents=[common], help="show the jobs of the queue")
    status.add_argument("--json", action="store_true", help="print the status JSON contract")
    status.add_argument("--watch", action="store_true", help="refresh the table until Ctrl-C")

    for name, text in (("cancel", "cancel a job"), ("retry", "queue a failed or cancelled job again")):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("name", metavar="NAME")

    logs = commands.add_parser("logs", parents=[common], help="print a job's log")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the job is finished (or Ctrl-C)"
    )

    plot = commands.add_parser("plot", parents=[common], help="draw learning curves (one job, or all compared)")
    plot.add_argument("name", nargs="?", metavar="NAME", help="the job to plot (default: every job of the queue)")
    plot.add_argument("-o", "--output", metavar="FILE", type=Path, help="picture to write: .png, .pdf or .svg")

    predict = commands.add_parser(
        "predict", parents=[common], help="classify images with a finished job's model, prepared as the job's own"
    )
    predict.add_argument("name", metavar="NAME")
    predict.add_argument("images", nargs="+", metavar="IMAGE", type=Path, help="an image file, or a folder of them")
    predict.add_argument("--json", action="store_true", help="print a JSON array: image, class, probabilities, model")
    predict.add_argument(
        "--last", action="store_true", help="use the last epoch's model even when the job exported its best epoch's"
    )
    predict.add_argument("--verbose", action="store_true", help="show TensorFlow's and Keras' start-up messages too")

    commands.add_parser("schema", help="print the JSON Schema of job specs")

    demo = commands.add_parser("demo", help="train the bundled digits job, kill it mid-training, resume it")
    demo.add_argument("--queue", metavar="DIR", type=Path, help="queue folder (default: a new temporary folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``runner`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    out, err = Console(), Console(stderr=True, highlight=False)
    try:
        code = _dispatch(args, out, err)
        sys.stdout.flush()  # a closed pipe fails here, among the handlers below, not in the interpreter's exit
        return code
    except SpecError as error:
        for line in str(error).splitlines():
            err.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        return error.exit_code
    except RunnerError as error:
        err.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as error:  # `runner status | head`: the reader has what it wanted...
        if not _stdout_is_closed():
            return _unexpected(error, err)  # ...unless the pipe was another one (a subprocess, a socket)
        _silence_stdout()
        return 1  # as rich's console does when the table meets a closed pipe (and Python's docs advise)
    except Exception as error:  # the last line of defence: a bug must still not print a traceback
        return _unexpected(error, err)


def _unexpected(error: Exception, err: Console) -> int:
    if os.environ.get(DEBUG_ENV):
        raise error
    err.print(
        f"[red]error:[/] unexpected {type(error).__name__}: {escape(str(error))} "
        f"(set {DEBUG_ENV}=1 to see the traceback, and please report it)",
        soft_wrap=True,
    )
    return 1


def _stdout_is_closed() -> bool:
    """Whether stdout is the broken pipe: what failed to reach it is still in its buffer, and fails again."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        return True
    return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit does not fail on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _queue(args: argparse.Namespace) -> Queue:
    return open_queue(args.queue, must_exist=args.command != "submit")  # submitting creates the folder


def _dispatch(args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "demo":
        from runner.demo import run_demo  # noqa: PLC0415 (only the demo needs it)

        return run_demo(args.queue, out)
    if getattr(args, "verbose", False):
        os.environ[TF_VERBOSE_ENV] = "1"  # read when TensorFlow is first imported, which is later
    queue = _queue(args)
    if args.command == "submit":
        return _submit(queue, args.specs, err, replace=args.replace)
    if args.command == "edit":
        return _edit(queue, args.name, args.spec, ask=not args.yes, err=err)
    if args.command == "delete":
        return _delete(queue, args.name, keep_checkpoints=args.keep_checkpoints, ask=not args.yes, err=err)
    if args.command == "work":
        options = SessionOptions(
            job=args.job,
            max_hours=args.max_hours,
            flush=args.flush,
            release_runtime=args.release_runtime,
            refresh_data=args.refresh_data,
        )
        return _work(queue, options, out, err)
    if args.command == "status":
        return _status(queue, as_json=args.json, watch=args.watch, out=out, err=err)
    if args.command == "cancel":
        err.print(queue.cancel(args.name), markup=False, soft_wrap=True)
        return 0
    if args.command == "retry":
        err.print(queue.retry(args.name), markup=False, soft_wrap=True)
        return 0
    if args.command == "logs":
        return _logs(queue, args.name, follow=args.follow)
    if args.command == "plot":
        return _plot(queue, args.name, args.output, err)
    if args.command == "predict":
        return _predict(queue, args.name, args.images, last=args.last, as_json=args.json, out=out, err=err)
    raise AssertionError(f"unhandled command {args.command!r}")


def _submit(queue: Queue, paths: list[Path], err: Console, *, replace: bool = False) -> int:
    specs, problems = [], []
    for path in paths:  # validate every spec before writing anything
        try:
            specs.append(load_spec(path))
        except SpecError as error:
            problems.extend(str(error).splitlines())
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    problems += [f"job name {name!r} appears in more than one spec: give each its own name" for name in duplicated]
    if problems:
        raise SpecError("submit", problems)
    for spec in specs:
        try:
            job, new = queue.submit(spec)
        except JobExists:  # the name is taken by another spec
            if not replace:
                raise
            if _discarding_confirmed(queue, spec, err):
                err.print(replace_spec(queue, spec).describe(), soft_wrap=True, markup=False)
            continue
        verb = "submitted" if new else "already in the queue, unchanged:"
        err.print(f"{verb} {spec.name} → {job.paths.folder}", soft_wrap=True, markup=False)
    return 0


def _edit(queue: Queue, name: str, path: Path, *, ask: bool, err: Console) -> int:
    queue.job(name)  # a wrong name is said before the spec is read
    spec = load_spec(path)
    if spec.name != name:
        raise UsageError(f"{path} names job {spec.name!r}, not {name!r}: a job keeps its name (set name: {name})")
    if ask and not _discarding_confirmed(queue, spec, err):
        return 1
    err.print(replace_spec(queue, spec).describe(), soft_wrap=True, markup=False)
    return 0


def _discarding_confirmed(queue: Queue, spec: JobSpec, err: Console) -> bool:
    """On a terminal, before a new spec discards checkpoints: whether the person says to go on."""
    job = queue.job(spec.name)
    try:
        discarding = [field for field in spec_changes(job.read_spec(), spec) if shapes_checkpoints(field)]
    except RunnerError:
        return True  # an unreadable old spec: nothing to weigh
    checkpoints = len(CheckpointStore(job, keep=1).committed())
    if not discarding or not checkpoints:
        return True
    return _confirmed(
        f"job {spec.name!r}: the new {', '.join(discarding)} discards its {counted(checkpoints, 'checkpoint')}, and "
        "it trains from the beginning. Replace its spec?",
        "nothing was changed",
        err,
    )


def _confirmed(question: str, refused: str, err: Console) -> bool:
    """Ask a yes/no question on a terminal (``True`` elsewhere: a script or a notebook's cell cannot answer)."""
    if not sys.stdin.isatty():
        return True
    err.print(f"{question} [y/N] ", end="", markup=False, soft_wrap=True)
    try:
        answer = input().strip().lower()
    except EOFError:
        answer = ""
    if answer not in ("y", "yes"):
        err.print(refused, markup=False)
        return False
    return True


def _delete(queue: Queue, name: str, *, keep_checkpoints: bool, ask: bool, err: Console) -> int:
    job = queue.job(name)
    view = queue.view(name)
    if view.lease_alive(time.time()) and view.holder is not None:  # refused before the question, not after
        raise LeaseHeld(name, view.holder.describe(), hint=f"`runner cancel {name}` stops it first")
    if ask:
        checkpoints = counted(len(CheckpointStore(job, keep=1).committed()), "checkpoint")
        what = (
            "everything but its checkpoints, exports, spec and history"
            if keep_checkpoints
            else f"it with its {checkpoints} and its exported model, if any"
        )
        question = f"delete job {name!r} ({view.shown_state(time.time())}): remove {what}?"
        if not _confirmed(question, "nothing was deleted", err):
            return 1
    err.print(delete_job(queue, name, keep_checkpoints=keep_checkpoints).describe(), soft_wrap=True, markup=False)
    return 0


def _work(queue: Queue, options: SessionOptions, out: Console, err: Console) -> int:
    # The table is printed before --flush unmounts Drive (and before --release-runtime ends the VM).
    result = run_session(
        queue, options, err, before_finish=lambda _: out.print(render_status(queue, width=out.width))
    )
    if result.skipped:
        err.print(f"left to other live workers: {', '.join(result.skipped)}", markup=False)
    return result.exit_code


def _a_person_waits() -> None:
    """Give up on a failing mount in seconds, not minutes (or sooner, where $RUNNER_RETRY_BUDGET says so)."""
    storage.set_retry_budget(min(storage.retry_budget(), defaults.STATUS_RETRY_BUDGET_S))


def _status(queue: Queue, *, as_json: bool, watch: bool, out: Console, err: Console) -> int:
    _a_person_waits()
    if watch:
        watch_status(queue, out, interval=defaults.STATUS_WATCH_INTERVAL_S)
        return 0
    try:
        if as_json:
            print(json.dumps(status_records(queue.views(), time.time()), indent=2))
        else:
            out.print(render_status(queue, width=out.width))
    except StorageError as error:  # the folder fails: still say what this machine keeps of its jobs
        err.print(queue_failing(queue, error, time.time()), soft_wrap=True)
        return error.exit_code
    return 0


def _plot(queue: Queue, name: str | None, output: Path | None, err: Console) -> int:
    from runner.curves import plot_job, plot_queue  # noqa: PLC0415 (matplotlib loads for this command only)

    _a_person_waits()
    path = plot_job(queue, name, output) if name is not None else plot_queue(queue, output)
    err.print(f"wrote {path}", markup=False, soft_wrap=True)
    return 0


def _predict(  # noqa: PLR0913 (the command's own options)
    queue: Queue, name: str, images: list[Path], *, last: bool, as_json: bool, out: Console, err: Console
) -> int:
    job = queue.job(name)  # a wrong name or path is said before TensorFlow takes seconds to load
    if missing := next((path for path in images if not path.exists()), None):
        raise UsageError(f"no such image or folder: {missing}")
    for path in (path for path in images if path.is_file()):  # a wrong file, too, is said before TensorFlow loads
        try:
            head = first_bytes(path)
        except OSError as error:
            raise UsageError(f"cannot read {path} ({error.strerror}): pass image files you can read") from None
        if not is_image(head):
            raise UsageError(
                f"{path} is not a JPEG, PNG, GIF or BMP image (it begins with {head[:4]!r}): pass image files, or "
                "folders of them"
            )
    from runner.train.outputs.predict import predict_images  # noqa: PLC0415 (TensorFlow loads for this command only)

    predictions = predict_images(job, images, last=last)
    if predictions[0].model == "best":
        err.print("(the best epoch's model, final/best.keras; --last uses the last epoch's)", markup=False)
    if as_json:
        print(json.dumps([prediction.as_dict() for prediction in predictions], indent=2))
        return 0
    for prediction in predictions:
        ranked = sorted(prediction.probabilities.items(), key=lambda item: -item[1])
        others = ", ".join(f"{label} {chance:.1%}" for label, chance in ranked[1:3])
        out.print(f"{prediction.image}: {ranked[0][0]} {ranked[0][1]:.1%} ({others})", markup=False, soft_wrap=True)
    return 0


def _logs(queue: Queue, name: str, *, follow: bool) -> int:
    from runner.joblog import show_log  # noqa: PLC0415

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    job = queue.job(name)
    waiting = follow and not job.paths.log.exists()
    if waiting:
        print(f"(job {name!r} has no log yet: waiting for its first lines; Ctrl-C stops)", file=sys.stderr, flush=True)
    if not show_log(job, write, follow=follow) and not waiting:
        print(f"(job {name!r} has no log yet)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
