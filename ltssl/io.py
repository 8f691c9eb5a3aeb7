"""File writes that never leave a partial file to be read back, and file checksums.

The lowest module of the package (it imports nothing from ltssl): configs, manifests, ledger
records, results, parquet files and checkpoints are all written through it. Each atomic writer
goes to a temporary file in the same folder, fsyncs it and renames it over the target; on any
error the temporary file is removed and the previous file stays intact. A full disk raises
:class:`DiskFullError`, whose one-line message names the path and says "no space left on device".
:class:`LineAppender` appends whole lines to a file that other processes tail (metrics.jsonl).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

HASH_CHUNK_BYTES = 1 << 22  # 4 MiB reads: the hash, not the syscalls, bounds the speed


class DiskFullError(OSError):
    """A write found no space left on device (errno ENOSPC). ``str()`` is one line naming the path."""

    def __init__(self, path: str | os.PathLike, detail: str = ""):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path = Path(path)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.path}: no space left on device" + (f" ({self.detail})" if self.detail else "")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is ENOSPC.

    torch.save reports a failed write as a RuntimeError ("unexpected pos ...") raised while
    handling the OSError, so the whole ``__cause__`` / ``__context__`` chain is searched.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file beside ``path``, fsync it, rename it to ``path``.

    Raises :class:`DiskFullError` (the previous ``path``, if any, untouched) when the disk fills.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path, "the previous file is intact") from exc
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(path, "the previous file is intact") from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(data, **dumps_kwargs)`` to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, **dumps_kwargs))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (for checkpoints loaded with ``weights_only=True``)."""
    import torch  # deferred: the ledger, results and config writers must not pay for importing torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_parquet(path: str | os.PathLike, table: Any) -> Path:
    """Write a ``pyarrow.Table`` as parquet to ``path`` atomically; creates the parent folder."""
    import pyarrow.parquet as pq  # deferred: only the results writer needs pyarrow

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: pq.write_table(table, fh))


class LineAppender:
    """Append whole lines to ``path`` (created if missing), each reaching the file as it is written.

    For a file another process tails (metrics.jsonl): every readers' parser keeps only the
    complete lines. When the disk fills in the middle of a line, the written fragment stays (a
    tailer may already have read it) and :class:`DiskFullError` is raised; the next line written,
    by this object or by a later one on the same file (a resumed job), first ends the fragment
    with a newline, so the fragment is a line of its own that no JSON parser accepts (a strict
    prefix of a JSON object is never valid JSON) and the new line arrives whole.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.path, "nothing was written") from exc
            raise
        self._mid_line = _ends_mid_line(self.path)

    def write(self, line: str) -> None:
        """Append ``line`` (a newline is added; ``line`` itself must not contain one)."""
        if self.fd is None:
            raise ValueError(f"{self.path}: write to a closed LineAppender")
        lead = b"\n" if self._mid_line else b""
        data = lead + line.encode() + b"\n"
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]  # a full disk gives a short write, then ENOSPC
        except OSError as exc:
            written = len(data) - len(view)
            if written:  # else the file is as it was
                self._mid_line = written != len(lead)  # only the fragment's newline went down: at a line start
            if is_disk_full(exc):
                raise DiskFullError(self.path, "the line was not written whole; earlier lines are intact") from exc
            raise
        self._mid_line = False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "LineAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_mid_line(path: Path) -> bool:
    """Whether a non-empty ``path`` lacks its final newline (a fragment left by a full disk)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, io.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, io.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


_SHA256: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> digest, for this process


def file_sha256(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a file's bytes.

    Remembered in this process per (path, size, mtime, inode): a second call on an unchanged file
    (the prepared dataset's check, then each loader's) costs a ``stat``.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
                digest.update(chunk)
        _SHA256[key] = "sha256:" + digest.hexdigest()
    return _SHA256[key]
