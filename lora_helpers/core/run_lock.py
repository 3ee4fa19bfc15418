"""One writer per run folder: a lock file that names its holder.

Two trainings in one run folder would delete each other's temporary checkpoints and interleave
``log.jsonl``. :func:`lock_run_folder` holds ``run/.lock`` for the length of a training: a ``flock``
on it (the kernel drops it when the process ends, however it ends) keeps a second process out, and
the file's content names the holder, so the refusal can say who it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from lora_helpers.core.run_folder import LOCK_FILE

try:  # POSIX; elsewhere the lock file's process id alone tells whether it is held
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunFolderLockedError", "lock_run_folder"]


class RunFolderLockedError(RuntimeError):
    """Another process (named in the message) is writing the run folder."""


# The holder touches the lock file this often; a lock written on another machine (a shared Drive)
# that has not been touched for _STALE_AFTER_S belongs to a process that is gone.
_HEARTBEAT_S = 30.0
_STALE_AFTER_S = 180.0


def _process_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), or None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: Any, started: str | None) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started`` (not a reused id)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError):
        return False
    stat = _process_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and (started is None or stat[19] == started)  # a zombie holds nothing


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):  # empty, or cut short by a crash while written
        return {}
    return data if isinstance(data, dict) else {}


def _describe_holder(holder: dict[str, Any]) -> str:
    if not holder:  # locked, but its holder has not written its name yet
        return "another process"
    where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host', 'another machine')}"
    return (f"{holder.get('purpose', 'a process')} by process {holder.get('pid', '?')}{where} "
            f"since {holder.get('since', '?')}")


def _holder_active(fd: int, holder: dict[str, Any], flocked: bool) -> bool:
    """Whether the process named in a lock file we could open still writes the folder."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():  # a shared folder: only its heartbeat tells
        return time.time() - os.fstat(fd).st_mtime < _STALE_AFTER_S
    # On this machine the kernel drops a flock when its process ends, so getting it proves the holder gone.
    return not flocked and _pid_alive(holder.get("pid"), holder.get("process_start"))


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: this system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _acquire(path: Path, purpose: str, say) -> int:
    for _ in range(20):  # the holder may remove the file between our open and our flock: open it again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flocked = _try_flock(fd)
            holder = _read_holder(fd)
            if flocked is False or _holder_active(fd, holder, bool(flocked)):
                other = "" if holder.get("host") == socket.gethostname() else (
                    f"; if that process is gone (a Colab runtime that was reset), delete {path} or wait "
                    f"{_STALE_AFTER_S / 60:.0f} minutes")
                raise RunFolderLockedError(
                    f"{path.parent} is in use: {_describe_holder(holder)} (lock file {path}). Wait for it to "
                    f"finish or stop it, or choose another run folder{other}")
            if not _same_file(fd, path):
                os.close(fd)
                continue
            if holder:
                say(f"note: {path.parent}: taking over the lock of {_describe_holder(holder)}, which is no longer "
                    "running")
            stat = _process_stat(os.getpid())
            record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "process_start": stat[19] if stat else None}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode("utf-8"))
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise RunFolderLockedError(f"{path}: could not take the lock; other processes keep changing it")


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(_HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def lock_run_folder(run_dir: str | os.PathLike, *, purpose: str = "training", say=print) -> Iterator[Path]:
    """Hold ``run_dir/.lock`` while writing the run folder, so two trainings never share one.

    Two trainings in one folder would delete each other's temporary checkpoints and interleave the
    log. The lock is a ``flock`` on the lock file (the kernel drops it when the process ends, however
    it ends); the file names the holder, so the refusal can say who it is. A lock left by a process
    that is gone is taken over with a note; one written on another machine (a shared Drive) is
    taken over once its heartbeat is older than a few minutes.

    Args:
        run_dir: the run folder (it must exist).
        purpose: what the holder does, for the message ("training").
        say: prints the note about a taken-over lock.

    Yields:
        The lock file; released (and removed) on leaving the block, also on an exception.

    Raises:
        RunFolderLockedError: naming the folder and the process that holds it.
    """
    path = Path(run_dir) / LOCK_FILE
    fd = _acquire(path, purpose, say)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), name="run-folder-lock", daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        # removed while still locked: a process that opened the old file finds it gone and opens anew
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)
