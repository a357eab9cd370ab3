"""SFTP source: files dropped into a remote directory, read once, then moved to processed/.

The host key is pinned from the config (no known_hosts lookup, no trust on first use), login is
by key only. A file is taken only once it has settled: no in-progress suffix (`.part`, ...)
and its size and mtime unchanged for `settle_seconds` (or an mtime already that old at first
sight), because SFTP has no "upload complete" event. A file moves to `processed_dir` only after
the commit of its last batch (posix-rename, so a same-named earlier file is replaced).

Failures never crash the worker: a lost connection is reopened with backoff and reported as
CONNECTION_ERROR; a wrong host key or a refused login is reported in words, status "error",
and retried slowly (an operator has to fix it; hammering the server would not help).
"""

from __future__ import annotations

import contextlib
import posixpath
import stat
from collections.abc import AsyncGenerator
from typing import Any

import asyncssh

from ingest.config import SFTPSourceConfig
from ingest.sources.objects import ItemRef, ItemSource, SourceFailure, backoff

FileRef = ItemRef  # name = path relative to cfg.directory, version = "size-mtime"


class SFTPSource(ItemSource[SFTPSourceConfig]):
    kind = "sftp"
    name_field = "path"
    version_field = "version"
    # after a wrong host key or a refused login: an operator has to fix it, so retry slowly
    auth_retry_seconds = 30.0

    def setup(self) -> None:
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._seen: dict[str, tuple[tuple[int, float], float]] = {}  # path -> (sig, since)

    @property
    def _where(self) -> str:
        return f"{self.cfg.user}@{self.cfg.host}:{self.cfg.port}"

    def _path(self, name: str) -> str:
        return posixpath.join(self.cfg.directory, name)

    def _processed(self) -> str:
        return posixpath.join(self.cfg.directory, self.cfg.processed_dir)

    async def _client(self) -> asyncssh.SFTPClient:
        if self._sftp is not None and self._conn is not None and not self._conn.is_closed():
            return self._sftp
        if self._conn is not None:  # dropped while idle: say so, then reconnect
            self._health.error(
                f"CONNECTION_ERROR: SFTP connection to {self._where} lost; reconnecting"
            )
            await self._sleep(backoff(self._failures))
            self._failures += 1
        await self.close_client()
        host_key = asyncssh.import_public_key(self.cfg.host_key)
        self._conn = await asyncssh.connect(
            self.cfg.host,
            self.cfg.port,
            username=self.cfg.user,
            client_keys=[str(self.cfg.key_path)],
            known_hosts=([host_key], [], []),
            agent_path=None,
            config=[],
            preferred_auth="publickey",
            connect_timeout=10,
            keepalive_interval=15,
        )
        self._sftp = await self._conn.start_sftp_client()
        return self._sftp

    async def _scan(self, directory: str, prefix: str = "") -> list[ItemRef]:
        sftp = await self._client()
        refs: list[ItemRef] = []
        async for entry in sftp.scandir(directory):
            attrs = entry.attrs
            if attrs.permissions is None or not stat.S_ISREG(attrs.permissions):
                continue
            name = str(entry.filename)
            size, mtime = int(attrs.size or 0), float(attrs.mtime or 0)
            refs.append(ItemRef(prefix + name, f"{size}-{int(mtime)}", size, mtime))
        return refs

    async def list_items(self) -> list[FileRef]:
        """Settled files directly in `directory` (processed/ and subdirectories excluded)."""
        refs = await self._scan(self.cfg.directory)
        self._failures = 0
        now = self._clock()
        ready: list[FileRef] = []
        seen: dict[str, tuple[tuple[int, float], float]] = {}
        for ref in refs:
            if ref.name.endswith(tuple(self.cfg.in_progress_suffixes)):
                continue
            sig = (ref.size, ref.mtime)
            prev = self._seen.get(ref.name)
            since = prev[1] if prev is not None and prev[0] == sig else now
            seen[ref.name] = (sig, since)
            settle = self.cfg.settle_seconds
            if now - ref.mtime >= settle or now - since >= settle:
                ready.append(ref)
        self._seen = seen
        return ready

    async def list_items_all(self) -> list[FileRef]:
        refs = await self._scan(self.cfg.directory)
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            refs += await self._scan(self._processed(), self.cfg.processed_dir + "/")
        return refs

    async def list_window(self, start: float, end: float) -> list[FileRef]:
        """Files (inbox and processed/) with mtime in [start, end), oldest first, for replay."""
        return await self.window(start, end)

    async def open_item(self, ref: ItemRef, start: int) -> AsyncGenerator[bytes, None]:
        sftp = await self._client()
        async with sftp.open(self._path(ref.name), "rb") as fh:
            if start:
                await fh.seek(start)
            while True:
                chunk: Any = await fh.read(self._chunk)  # bytes: the file is opened "rb"
                if not chunk:
                    return
                yield chunk

    async def finished(self, ref: ItemRef) -> None:
        """Move the committed file to processed/ (created if missing)."""
        sftp = await self._client()
        await sftp.makedirs(self._processed(), exist_ok=True)
        target = posixpath.join(self._processed(), posixpath.basename(ref.name))
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):  # another worker moved it already
            await sftp.posix_rename(self._path(ref.name), target)

    async def after_listing(self, refs: list[ItemRef], done: dict[str, str]) -> None:
        """A done file still in the inbox had its move fail (e.g. connection lost): retry."""
        for ref in refs:
            if done.get(ref.name) == ref.version:
                await self.finished(ref)

    def describe(self, exc: Exception) -> SourceFailure:
        where = self._where
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return SourceFailure(
                f"SFTP host key of {self.cfg.host}:{self.cfg.port} does not match the pinned"
                f" host_key in the config; refusing to connect ({exc})",
                self.auth_retry_seconds,
            )
        if isinstance(exc, asyncssh.PermissionDenied):
            return SourceFailure(
                f"SFTP login refused for {where} with key {self.cfg.key_path} ({exc})",
                self.auth_retry_seconds,
            )
        if isinstance(exc, (asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied)):
            return SourceFailure(f"SFTP {where}: {exc}", backoff(self._failures))
        self._failures += 1
        self._drop()
        if isinstance(exc, (OSError, asyncssh.Error, TimeoutError, EOFError)):
            return SourceFailure(
                f"CONNECTION_ERROR: SFTP {where} ({type(exc).__name__}: {exc}); reconnecting",
                backoff(self._failures),
                unreachable=True,
            )
        return SourceFailure(f"SFTP {where}: {type(exc).__name__}: {exc}", backoff(self._failures))

    def _drop(self) -> None:
        """Forget a broken connection; the next call reconnects."""
        if self._conn is not None:
            self._conn.abort()
        self._conn = None
        self._sftp = None

    async def close_client(self) -> None:
        conn: Any = self._conn
        self._conn = None
        self._sftp = None
        if conn is not None:
            conn.close()
            await conn.wait_closed()
