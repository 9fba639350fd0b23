"""Exporting the finished model into the job's ``final/`` folder, all formats at once or none.

The files are written on local disk first, then copied into a temporary folder in the job folder and renamed to
``final/``, so a kill during the export never leaves a half-written model where users look for one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras

from runner import storage
from runner.errors import StorageError
from runner.paths import JobPaths, temp_sibling
from runner.spec import JobSpec

FILE_NAMES = {"keras": "model.keras", "h5": "model.h5", "saved_model": "saved_model"}
"""What each export format is called inside ``final/``."""


def write_exports(model: keras.Model, spec: JobSpec, folder: Path) -> list[str]:
    """Save ``model`` in every format the spec asks for into ``folder`` (local disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in spec.export.formats:
        target = folder / FILE_NAMES[kind]
        if kind == "saved_model":
            model.export(str(target), verbose=False)  # a TF SavedModel for serving
        else:
            model.save(str(target))
    return [FILE_NAMES[kind] for kind in spec.export.formats]


def publish_exports(local: Path, paths: JobPaths, *, fence: Callable[[], None]) -> None:
    """Copy a local export folder to ``final/`` in the job folder, replacing an older one atomically, and read the
    copy back: a job is done only once its export is in the job folder as written."""
    temp = temp_sibling(paths.final)
    written: dict[Path, tuple[int, str]] = {}
    try:
        for source in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = source.relative_to(local)
            storage.make_dirs((temp / relative).parent)
            written[relative] = storage.copy_file(source, temp / relative)
        fence()
        if storage.exists(paths.final):
            # A previous session exported but died before marking the job done: replace its export.
            old = temp_sibling(paths.final, "old-final")
            storage.commit_dir(paths.final, old)
            storage.remove_tree(old)
        storage.commit_dir(temp, paths.final)
    except BaseException:
        storage.remove_tree(temp)
        raise
    for relative, expected in written.items():
        if storage.file_digest(paths.final / relative) != expected:
            raise StorageError(
                f"{paths.final / relative} does not read back as it was written: run `runner work` again",
                path=str(paths.final / relative),
                transient=True,
            )
