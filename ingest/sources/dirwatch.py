"""Wake an idle inbox worker when a file lands, instead of at its next poll (Linux inotify).

An idle worker scans the inbox every `poll_seconds` (0.1 s): a dropped file waited half of
that on average, up to all of it, before it was read (~4-7 % of a 200k-record phase of
bench_embedded, and as much of its spread). With a `DirWatch`, the kernel's inotify says
when a name is moved into or created in a watched directory, or a file there is closed after
writing, and the worker scans at once.

Only a hint: events carry nothing the scan relies on (the scan, its settle rules and leases
decide what is read), and the poll stays as the fallback wherever inotify says nothing (other
OSes, NFS or other network filesystems, a full inotify queue, no watches or instances left:
then `DirWatch.open` returns None or `watch` does nothing, and the worker polls as before).
Reached through ctypes: no build, no dependency; two libc calls and a non-blocking read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path

# <sys/inotify.h>
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_ONLYDIR = 0x01000000
IN_DONTFOLLOW = 0x02000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# A file renamed in, created, or written and closed; a tenant directory made or moved in.
# Not IN_MODIFY (an event per write) nor anything a read, a lease probe or a move out causes:
# the worker's own work never wakes it.
MASK = IN_MOVED_TO | IN_CREATE | IN_CLOSE_WRITE | IN_ONLYDIR | IN_DONTFOLLOW
_READ_BYTES = 1 << 16


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):  # not Linux (no inotify), no libc to be found
        return None
    return libc


class DirWatch:
    """An inotify instance whose events set `woken` (from the event loop's reader callback);
    the caller clears it before each scan, so an event during a scan wakes the next one."""

    _libc: ctypes.CDLL | None = None
    _loaded = False

    def __init__(self, fd: int, libc: ctypes.CDLL, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.woken = asyncio.Event()
        self._libc = libc
        self._loop = loop
        loop.add_reader(fd, self._drain)

    @classmethod
    def open(cls) -> DirWatch | None:
        """A watch on the running loop, or None where inotify is not to be had."""
        if not cls._loaded:
            DirWatch._libc, DirWatch._loaded = _libc(), True
        libc = cls._libc
        if libc is None:
            return None
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:  # EMFILE: the user's inotify instances are used up
            return None
        try:
            return cls(fd, libc, asyncio.get_running_loop())
        except Exception:
            os.close(fd)
            raise

    def watch(self, path: Path) -> bool:
        """Watch the directory (again: a directory made anew after a watch was dropped gets
        one; re-adding a live one only updates its mask). False if the kernel refused (gone,
        a symlink, no watches left): the poll finds its files."""
        assert self._libc is not None
        return int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)) >= 0

    def _drain(self) -> None:
        """Read every queued event (their contents do not matter) and wake the worker."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while len(os.read(self.fd, _READ_BYTES)) == _READ_BYTES:
                pass
        self.woken.set()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
