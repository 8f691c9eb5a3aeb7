"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file.

The lowest module of the package (it imports nothing from ltssl): configs, manifests, ledger
records, results, parquet files and checkpoints are all written through it. Each writer goes
to a temporary file in the same folder, fsyncs it and renames it over the target; on any error
(a full disk included) the temporary file is removed and the previous file stays intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file beside ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
