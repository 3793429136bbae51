"""Writing files so that nothing is ever half-written, and one writer per output folder.

- `replacing(path)`: write to a temporary name beside `path`, then rename over it: readers see the
  old file or the new one, never a torn one, and a failed write leaves `path` as it was.
- `append_csv_row(path, row)` / `keep_csv_rows(path, below)`: the run logs (losses.csv, val.csv);
  a resumed run first drops the rows logged after its checkpoint, then logs them again.
- `folder_lock(folder)`: a lock file holding the writer's process id, so two trainings (or two
  generators) cannot interleave their files in one folder. A lock whose process is gone (killed)
  is stale and taken over.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


@contextmanager
def replacing(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that choose a format by suffix
    still work); when the block succeeds it atomically replaces `path`, when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def append_csv_row(path, row: dict) -> None:
    """Append `row` to the CSV log `path` (created with `row`'s keys as header). An existing file
    keeps its own columns: a run resumed by a newer version that logs more columns stays readable
    (the new ones are left out of the old file; missing ones are empty)."""
    path = Path(path)
    new = not path.exists()
    fields = list(row)
    if not new:
        with open(path, newline="") as f:
            fields = next(csv.reader(f), None) or fields
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def keep_csv_rows(path, below: int) -> None:
    """Drop the rows of CSV log `path` whose `step` is >= `below` (atomically, see `replacing`);
    a log left with no rows is removed, so the next `append_csv_row` writes its header."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if int(r["step"]) < below]
        fields = reader.fieldnames
    if not rows:
        path.unlink()
        return
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def sha256(path, chunk: int = 1 << 24) -> str:
    """Hex digest of a file, read in 16 MB chunks (a dataset's vertices.npy can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def folder_lock(folder, tool: str, lock: Path | None = None) -> Iterator[None]:
    """Hold a lock file (default FOLDER/.lock; FOLDER is created) while `tool` writes `folder`.

    Raises FileExistsError naming the holder's process id when another live process holds it.
    """
    folder = Path(folder)
    if lock is None:
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / LOCK_NAME
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                holder = -1  # unreadable or half-written: treat as stale
            if holder > 0 and holder != os.getpid() and _alive(holder):
                raise FileExistsError(f"{folder} is in use by another {tool} (process {holder}, lock file {lock}); "
                                      "wait for it to finish or write into another folder") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {tool}\n")
        break
    else:
        raise FileExistsError(f"could not take the lock {lock}; another process keeps creating it")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
