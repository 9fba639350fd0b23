"""Downloading a file (a dataset archive, ImageNet weights): whole or not at all, with a progress bar, retrying
what is worth retrying.

Transient failures (a refused or reset connection, a timeout, a body cut short, HTTP 5xx and 429) are retried
under the core's policy, :func:`runner.storage.retrying`, with this module's own test of what is transient;
a 404 or 403 is answered at once, naming the URL and the status.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from runner import defaults, storage
from runner.errors import DatasetError, RunnerError, StorageError
from runner.paths import temp_sibling

DOWNLOAD_TIMEOUT_S = 60.0
"""Seconds a download may wait to connect, or for the next bytes, before the try counts as failed."""

_TRANSIENT_HTTP = frozenset({408, 425, 429})
"""HTTP statuses below 500 that mean "try again later"; every 5xx does too."""

_CHUNK = 1 << 20


def is_transient_download(error: BaseException) -> bool:
    """Whether a download error is worth another try: a dropped or refused connection, a timeout, 5xx or 429."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code in _TRANSIENT_HTTP or error.code >= 500
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return False  # e.g. "unknown url type": retrying cannot help
        error = error.reason
    if isinstance(error, socket.gaierror):
        return error.errno == socket.EAI_AGAIN  # "temporary failure in name resolution"; a typo is permanent
    transient = (ConnectionError, TimeoutError, http.client.IncompleteRead, ssl.SSLEOFError)
    return isinstance(error, transient) or storage.is_transient(error)


PROBE_TIMEOUT_S = 15.0
"""Seconds to wait for a server to say whether the file at a URL changed; a cached copy is used when it is silent."""

Identity = dict[str, Any]
"""What a server says identifies the file at a URL: ``etag``, ``last_modified`` and ``size`` (each may be ``None``)."""


def identity_of(headers: Message) -> Identity:
    """The identity a response's headers give (every value ``None`` when the server sends none of them)."""
    size = headers.get("Content-Length")
    return {
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
        "size": int(size) if size is not None and size.isdigit() else None,
    }


def same_file(cached: Identity | None, current: Identity) -> bool | None:
    """Whether two identities name the same file; ``None`` when they have nothing to compare.

    The same ETag (weak or strong) is the same file. Different ETags with the same Last-Modified and size are too:
    servers behind a load balancer may each make their own ETag for one file, and fetching a large dataset again
    at every resume would be worse than missing a change that kept both its size and its time."""
    if not cached:
        return None
    etags = [_strong(identity.get("etag")) for identity in (cached, current)]
    if None not in etags and etags[0] == etags[1]:
        return True
    compared = [key for key in ("last_modified", "size") if None not in (cached.get(key), current.get(key))]
    if None not in etags and len(compared) < 2:
        return False
    if not compared:
        return None
    return all(cached[key] == current[key] for key in compared)


def _strong(etag: str | None) -> str | None:
    return etag[2:] if etag and etag.startswith("W/") else etag


def probe(url: str) -> tuple[Identity | None, str | None]:
    """Ask the server what the file at ``url`` is now, in one quick try: its identity, or ``None`` and why not.

    HEAD first; a server that refuses HEAD (405, 501, or 403 from signed URLs) is asked with a GET whose body is
    not read.
    """
    headers = {"User-Agent": "runner (resumable training jobs)"}
    for method in ("HEAD", "GET"):
        request = urllib.request.Request(url, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
                return identity_of(response.headers), None
        except urllib.error.HTTPError as error:
            if method == "HEAD" and error.code in (403, 405, 501):
                continue
            return None, _describe(error)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            return None, _describe(error)
    return None, "no answer"


def download(
    url: str,
    target: Path,
    *,
    console: Console | None = None,
    sleep: Callable[[float], None] = time.sleep,
    label: str = "dataset",
    check: str = "dataset.source",
    error: type[RunnerError] = DatasetError,
) -> Identity:
    """Download ``url`` to ``target`` (whole or not at all), retrying transient network errors; the identity the
    server gave the file. ``label`` heads the progress line, ``check`` is what a failure tells the user to check,
    and ``error`` the error raised for one."""
    fetch = storage.retrying(
        transient=is_transient_download,
        sleep=sleep,
        shorter_budget=unreachable_budget,
        describe=lambda url, *_: f"downloading {url}",
    )(_download_once)
    try:
        return fetch(url, target, console, label, check, error)  # type: ignore[no-any-return]
    except (StorageError, http.client.HTTPException) as failure:
        cause = failure.__cause__ if isinstance(failure, StorageError) else failure
        network = (urllib.error.URLError, ConnectionError, TimeoutError)
        if isinstance(failure, StorageError) and not isinstance(cause, network):
            raise  # the cache's disk failed, not the network
        raise error(
            f"could not download {url}: {_describe(cause)}, still failing after retries: check the network "
            f"connection and {check}, then run again"
        ) from None


def unreachable_budget(error: BaseException) -> float | None:
    """A short budget for a host that refuses the connection or a name that does not resolve for now: they are
    seldom a blip, and a person is waiting to hear about a wrong address."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
        return defaults.UNREACHABLE_RETRY_BUDGET_S
    return None


def _download_once(
    url: str, target: Path, console: Console | None, label: str, check: str, error: type[RunnerError]
) -> Identity:
    partial = temp_sibling(target)
    request = urllib.request.Request(url, headers={"User-Agent": "runner (resumable training jobs)"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            total = response.length
            received = 0
            with _progress(console, url, total, label) as advance:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    advance(len(chunk))
            if total is not None and received < total:
                raise http.client.IncompleteRead(b"", total - received)  # the server closed early: transient
            out.flush()
            os.fsync(out.fileno())
            identity = identity_of(response.headers)
        os.replace(partial, target)
        return identity
    except urllib.error.HTTPError as failure:
        if is_transient_download(failure):
            raise
        raise error(f"downloading {url} failed with HTTP {failure.code} ({failure.reason}): check {check}") from None
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def _progress(console: Console | None, url: str, total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar (bytes, rate, time left) on ``console``; nothing without one."""
    if console is None:
        yield lambda _: None
        return
    columns = (TextColumn("download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        console.print(f"{label}: downloading {escape(url)}")
        task = progress.add_task("download", total=total)
        yield lambda size: progress.advance(task, size)


def _describe(error: BaseException | None) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} ({error.reason})"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}" if error is not None else "unknown error"
