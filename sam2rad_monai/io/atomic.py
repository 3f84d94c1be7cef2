"""Atomic file writes: a reader never sees a half-written output file.

Every writer in :mod:`sam2rad_monai.io` writes to a hidden temporary file in the
*same* folder as the target, flushes it to disk, then renames it over the target
with :func:`os.replace` (atomic on POSIX and Windows when both paths are on one
file system, which is why the temporary file must live next to the target).

If the writer raises, the temporary file is removed and the target is left as it
was. If the process is killed (SIGKILL, power loss) the target is still either
the old file or the complete new one; only a hidden ``.tmp-*`` file may remain.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMP_PREFIX", "atomic_write_bytes", "atomic_write_path"]

#: Prefix of the temporary files; hidden so that globbing for outputs skips them.
TEMP_PREFIX = ".tmp-"


def _temp_path_for(target: Path) -> Path:
    # Keep the full target name as the suffix so that writers that infer the
    # format from the extension (nibabel: ".nii.gz" means gzip) still do so.
    return target.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{target.name}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every OS/file system,
    # and a failure here does not make the written file any less complete.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``target``.

    The parent folder of ``target`` is created if needed. On an exception inside
    the ``with`` block the temporary file is deleted and the exception re-raised.

    Example::

        with atomic_write_path("out/seg.nii.gz") as tmp:
            nibabel.save(img, tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path_for(target)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the writer did not create the temporary file")
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically and return the target path."""
    target = Path(target)
    with atomic_write_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return target
