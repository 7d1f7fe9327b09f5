"""One run per output folder: an advisory lock held for the life of the process.

    lock = lock_folder("runs/x", "--output")   # FolderBusy if another run holds it
    ...                                        # write into runs/x
    lock.release()                             # or let the process end

The lock is `fcntl.flock` on the folder itself (an open file descriptor of the directory),
so the operating system releases it when the process ends in any way, SIGKILL and power
loss included: a dead run never leaves a lock behind. While it holds the lock the process
keeps its pid, start time and command line in `OWNER_FILE` inside the folder, which is what
the error of a second run names; the file is informational only (the lock is the kernel's)
and is removed on release.

NOTE: why the folder, not a lock file in it. A lock file cannot be deleted safely (a
process that opened it just before the delete locks the old, nameless file while a third
one creates and locks a new one), and one left behind would make the folder look used; a
folder is there for as long as the run's files are.

This module is a leaf apart from `minivgg.checkpoint`'s atomic write.
"""

import json
import os
import sys
import time

from minivgg.checkpoint import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs are not detected there
    fcntl = None

OWNER_FILE = ".owner.json"


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


class FolderLock:
    """The lock on one folder, held until `release()` or the end of the process."""

    def __init__(self, folder, fd):
        self.folder, self._fd, self._pid = folder, fd, os.getpid()
        self.created = False  # set by whoever made the folder (see `release`)

    @property
    def held(self):
        return self._fd is not None

    def release(self, remove_if_empty=False):
        """Give the folder back: remove the owner note and drop the lock (idempotent).
        With `remove_if_empty`, a folder this run `created` and left empty goes too (a
        run that failed while starting leaves nothing behind)."""
        # NOTE: a forked loader worker has a copy of this object and of the descriptor;
        # an unlock from there would free the folder under its parent's feet.
        if self._fd is None or os.getpid() != self._pid:
            return
        try:
            os.remove(os.path.join(self.folder, OWNER_FILE))
        except OSError:
            pass
        if remove_if_empty and self.created:
            try:
                os.rmdir(self.folder)  # fails, harmlessly, unless it is empty
            except OSError:
                pass
        if fcntl is not None:  # explicit: copies of the descriptor may outlive this close
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def lock_folder(folder, flag="--output"):
    """Lock the existing folder `folder` for this process -> `FolderLock`.

    Raises `FolderBusy`, in one line naming `flag`, the folder and the other process (pid,
    start time, command), when a live process holds it. Never waits.
    """
    folder = os.fspath(folder)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FolderBusy(f"{flag} {folder} is in use by another run ({owner(folder)}); "
                             f"wait for it to end, stop it, or choose another {flag}") from None
    note = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])}
    try:
        atomic_write(os.path.join(folder, OWNER_FILE),
                     lambda f: f.write(json.dumps(note).encode()), overwrite=True)
    except OSError:
        pass  # the note is a courtesy; the lock is what counts
    return FolderLock(folder, fd)


def owner(folder, wait=1.0):
    """Words for the process holding `folder`, from its owner note. A run that took the
    lock a moment ago may not have written its note yet: wait up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(os.path.join(folder, OWNER_FILE)) as f:
                note = json.load(f)
            return f"pid {note['pid']}, started {note['started']}: {note['command'][:120]}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "its pid is not recorded"
            time.sleep(0.05)
