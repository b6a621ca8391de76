"""Small operating-system helpers shared by the engine and the Kedro hooks (no torch import)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def pid_alive(pid: Any) -> bool:
    """True when process ``pid`` exists on this machine (someone else's process counts)."""
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread);
    0o022 where the platform does not say."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def disk_full_error(exc: BaseException, folder: str | Path, needed_bytes: int | None):
    """An ENOSPC ``OSError`` (or a library error wrapping "No space left on device") as one
    :class:`~uad.errors.UadError` naming the folder, the space needed and the space free; None for
    any other error."""
    import errno
    import shutil

    from uad.errors import UadError

    text = str(exc)
    if getattr(exc, "errno", None) != errno.ENOSPC and "No space left on device" not in text and "os error 28" not in text:
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    need = f"about {needed_bytes / 2**20:.1f} MiB" if needed_bytes else "more space"
    have = f"{free / 2**20:.1f} MiB free" if free is not None else "no free space"
    return UadError(f"no space left in {folder}: writing needed {need}, the disk has {have}; free some space "
                    "(old versions under data/ can go) or point the catalog / engine.checkpoint_dir elsewhere")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full_error(exc, path.parent, len(data))
        if full is not None:
            raise full from exc
        raise
