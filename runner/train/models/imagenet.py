"""ImageNet weights for the pretrained networks: downloaded once into runner's cache, checked, and reused.

```
<cache>/weights/
    <file>              a Keras weights file, named as keras.applications names it
    <file>.sha256       its sha256, written before the file is renamed into place: every later use checks it
    <file>.lock         one process at a time fetches a file
```

A file is fetched from Keras' own origin, or from a mirror when ``$RUNNER_WEIGHTS_URL`` names one (the files
side by side under that URL, as a mirror or a test server holds them), with the download's retry policy and a
progress bar. Before it is kept it is checked against what is known of it: the mirror's ``SHA256SUMS`` (the
format ``sha256sum`` writes) when it serves one, else the md5 Keras publishes for it (EfficientNet's and
ResNet's; Keras publishes none for MobileNetV2's, whose sha256 is then recorded at the first download and
checked from then on). A file that does not match is not kept, and the error names the URL and the cache path.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from filelock import FileLock
from rich.console import Console
from rich.markup import escape

from runner import storage
from runner.errors import ModelError, StorageError
from runner.networks import ImagenetWeights
from runner.paths import temp_sibling
from runner.train.data.download import DOWNLOAD_TIMEOUT_S, download, is_transient_download, unreachable_budget

WEIGHTS_URL_ENV = "RUNNER_WEIGHTS_URL"
"""A mirror's base URL to fetch the weights files from instead of Keras' origin."""

SUMS_FILE = "SHA256SUMS"
"""The mirror's list of ``<sha256>  <file>`` lines, checked when it serves one."""


def fetch_imagenet_weights(
    weights: ImagenetWeights,
    *,
    cache_dir: Path,
    console: Console | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """The cached copy of ``weights``, downloaded and checked first if there is none (or it is damaged)."""
    folder = cache_dir / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / weights.file
    pin = folder / f"{weights.file}.sha256"
    with FileLock(str(folder / f"{weights.file}.lock")):
        if path.exists():
            pinned = pin.read_text().strip() if pin.exists() else None
            if pinned is not None and _sha256(path) == pinned:
                return path
            _say(console, f"[yellow]warning:[/] weights: the cached {escape(str(path))} does not match its "
                 "recorded sha256: downloading it again")  # fmt: skip
            path.unlink()
            pin.unlink(missing_ok=True)
        mirror = environ.get(WEIGHTS_URL_ENV, "").strip().rstrip("/")
        url = f"{mirror}/{weights.file}" if mirror else weights.origin
        sums_url = f"{mirror}/{SUMS_FILE}" if mirror else None
        expected = _mirror_sums(sums_url).get(weights.file) if sums_url else None
        staged = temp_sibling(path)
        check = f"${WEIGHTS_URL_ENV}" if mirror else f"the origin (or set ${WEIGHTS_URL_ENV} to a mirror)"
        try:
            download(url, staged, console=console, label="weights", check=check, error=ModelError)
        except ModelError as error:
            raise ModelError(f"{error}; the weights file would be {path}") from None
        try:
            sha256 = _sha256(staged)
            if expected is not None and sha256 != expected.lower():
                raise ModelError(
                    f"the weights downloaded from {url} do not match their sha256 in {sums_url} (got {sha256}, "
                    f"expected {expected}); nothing was kept in {path}: run again, and if it persists the mirror's "
                    f"file or its {SUMS_FILE} is wrong"
                )
            if expected is None and weights.md5 is not None and (md5 := _md5(staged)) != weights.md5:
                raise ModelError(
                    f"the weights downloaded from {url} do not match the md5 Keras publishes for {weights.file} "
                    f"(got {md5}, expected {weights.md5}); nothing was kept in {path}: run again, and if it persists "
                    "the file served there is not Keras' own"
                )
            storage.atomic_write_bytes(pin, f"{sha256}\n".encode())
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)
        how = "checked against " + (SUMS_FILE if expected else "Keras' md5") if expected or weights.md5 else "recorded"
        _say(console, f"weights: {escape(weights.file)} kept in {escape(str(folder))} (sha256 {sha256[:12]}, {how})")
        return path


def _mirror_sums(url: str) -> dict[str, str]:
    """``file -> sha256`` from a mirror's SHA256SUMS; empty when it serves none (404)."""
    fetch = storage.retrying(
        transient=is_transient_download, shorter_budget=unreachable_budget, describe=lambda *_: f"reading {url}"
    )(_read)
    try:
        text = fetch(url)
    except (StorageError, urllib.error.URLError) as failure:
        error = failure.__cause__ if isinstance(failure, StorageError) else failure
        if isinstance(error, urllib.error.HTTPError):
            if error.code in (403, 404):
                return {}
            reason = f"HTTP {error.code} ({error.reason})"
        else:
            reason = str(error.reason if isinstance(error, urllib.error.URLError) else error)
        raise ModelError(f"could not read {url}: {reason}: check ${WEIGHTS_URL_ENV} and the network") from None
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def _read(url: str) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": "runner (resumable training jobs)"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        return response.read().decode("utf-8", errors="replace")


def _sha256(path: Path) -> str:
    return storage.file_digest(path)[1]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # the hash Keras publishes, not a defence of ours
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _say(console: Console | None, text: str) -> None:
    if console is not None:
        console.print(text, soft_wrap=True, highlight=False)
