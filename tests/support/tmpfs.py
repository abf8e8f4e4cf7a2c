"""A small, real file system to fill up: a tmpfs mounted for one test.

``mount -t tmpfs`` needs root (or CAP_SYS_ADMIN); where it is not permitted the test is skipped,
saying why. :class:`SmallFs` fills the file system with a filler file and frees it again, so a
test controls exactly when the store's disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


class SmallFs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self) -> int:
        """Take every free byte (a filler file); returns how many it took."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        taken = 0
        try:
            for size in (65536, 4096, 512, 1):
                while True:
                    try:
                        taken += os.write(fd, b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        return taken

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def available(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def small_fs(directory: Path, size_kb: int) -> Iterator[SmallFs]:
    """A tmpfs of ``size_kb`` KiB mounted on ``directory`` for the ``with`` block."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs): not running as root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield SmallFs(directory)
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)
