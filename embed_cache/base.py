"""The loader interface, and what every command and loader shares. A split holds audio (A) and
video or text (B) rows, and for each B row its A row (5 captions per audio: 5 B rows): the training
pairs and the one-to-many relevance of retrieval both come from that index."""
from __future__ import annotations

import errno
import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

class DataError(ValueError):
    """Bad input data. The message is one line naming the file, the row or key, and the problem."""


class Rows:
    """Rows of a (memory-mapped) float array: [idx] (an int tensor, array or slice) reads just those
    rows, as an (n, D) float32 unit-norm tensor; a training batch costs its own rows of I/O."""

    def __init__(self, array, index: np.ndarray):
        self.array, self.index = array, np.asarray(index, dtype=np.int64)   # (N_file, D), (N,)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.index), self.array.shape[1])

    def take(self, idx) -> "Rows":   # a lazy view: nothing is read
        return Rows(self.array, self.index[np.asarray(idx)])

    def __getitem__(self, idx) -> torch.Tensor:
        rows = self.index[idx] if isinstance(idx, slice) else self.index[np.asarray(idx)]
        x = torch.from_numpy(np.asarray(read_rows(self.array, rows), dtype=np.float32))
        return torch.nn.functional.normalize(x, dim=-1)


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """array[rows]; from a memory-mapped .npy by plain reads, not through the mapping, whose
    pages would stay resident: one read for dense rows (a chunk), one per row for sparse ones."""
    if not (isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous) or len(rows) == 0:
        return np.asarray(array[rows])
    row_bytes, dim = array.strides[0], array.shape[1]
    lo, hi = int(rows.min()), int(rows.max()) + 1
    with open(array.filename, "rb") as f:
        if hi - lo <= 4 * len(rows):
            f.seek(array.offset + lo * row_bytes)
            return np.fromfile(f, dtype=array.dtype, count=(hi - lo) * dim).reshape(-1, dim)[rows - lo]
        buf = b"".join(os.pread(f.fileno(), row_bytes, array.offset + int(r) * row_bytes) for r in rows)
    return np.frombuffer(bytearray(buf), dtype=array.dtype).reshape(len(rows), dim)  # writable


@dataclass
class Split:
    a: torch.Tensor       # (N_a, D_A) unit-norm audio embeddings (or Rows, for large files)
    b: torch.Tensor       # (N_b, D_B) unit-norm video/text embeddings (or Rows)
    b_to_a: torch.Tensor  # (N_b,) int64: the row of `a` that each row of `b` is paired with
    a_ids: Optional[list] = None  # the id of each `a` row (file data; None: the row number is the id)
    b_ids: Optional[list] = None  # the id of each `b` row: the id it was paired by (an audio's captions share it)
    b_item: Optional[torch.Tensor] = None  # (N_b,) int64: each b row's distinct item, where rows repeat (class prompts)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pairs (a[b_to_a], b): (N_b, D_A), (N_b, D_B); lazy when a is Rows."""
        return (self.a.take(self.b_to_a.numpy()) if isinstance(self.a, Rows) else self.a[self.b_to_a]), self.b

    def b_rows(self) -> torch.Tensor:
        """(N_items,) the first b row of each distinct B item: what retrieval ranks and translates."""
        return torch.arange(len(self.b)) if self.b_item is None else torch.from_numpy(
            np.unique(self.b_item.numpy(), return_index=True)[1])

    def retrieval(self, direction: int):
        """(queries, gallery, relevant): direction 0 is B->A, the distinct B items ranking the audio, relevant
        the audio row of each (Q,), or (P, 2) (item, audio) pairs where an item has several audios; 1 is A->B,
        relevant (P, 2) (audio, item) pairs. Identical b rows are one item (b_item), as identical audio is one clip."""
        a, b = (x[:] if isinstance(x, Rows) else x for x in (self.a, self.b))  # evaluation reads the split
        merged = self.b_item is not None
        pairs = torch.stack([self.b_to_a, self.b_item if merged else torch.arange(len(b))], 1)   # (audio, item)
        b = b[self.b_rows()] if merged else b
        return (b, a, pairs.flip(1) if merged else self.b_to_a) if direction == 0 else (a, b, pairs)


@dataclass
class Dataset:
    pair: str                       # "audio-video" or "audio-text"
    spec: str                       # how to load it again (stored in checkpoints)
    splits: dict[str, Split]        # "train", "val", "test"
    oracle: Optional[Callable] = field(default=None, repr=False)  # synthetic only: ceiling scores
    notes: str = ""                 # what the loader saw: norms before normalising, dropped rows
    encoder: Optional[str] = None   # the model that embedded both sides, where the files say (extract.py caches)

    @property
    def dims(self) -> tuple[int, int]:
        return self.splits["train"].a.shape[1], self.splits["train"].b.shape[1]

    def summary(self) -> str:
        parts = [f"{k}: {len(s.a)} audio / {len(s.b)} {self.pair.split('-')[1]}" for k, s in self.splits.items()]
        text = f"{self.spec} ({self.pair}, dims {self.dims[0]}/{self.dims[1]}): " + ", ".join(parts)
        return text + (f"; {self.notes}" if self.notes else "")


def atomic_write(path: str, write) -> None:
    """Call write(f) on a temp file of this writer's own beside path (two writers never share one), then make it
    path: all of it or none of it. The data is fsynced before the rename (else a power loss can keep the rename,
    not the data), the folder after, where the file system allows (CIFS, sshfs, some FUSE mounts refuse)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            try:
                os.fsync(f.fileno())
            except OSError as e:
                raise OSError(e.errno, f"{path}: cannot be written durably (fsync: {e.strerror})") from None
        os.replace(tmp, path)  # a crash before this line leaves the previous file intact
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)           # the rename itself is durable only once the folder is
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def read_text(path: str) -> str:
    """A text file's contents: UTF-8, with or without the BOM Excel writes; another encoding is one DataError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4096]:   # UTF-16's byte-order marks, or its NULs
            raise DataError(f"{path}: the text is UTF-16 (its byte-order mark or NUL bytes say so); save it as UTF-8")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({reason(e)})") from None


def reason(e: BaseException) -> str:
    """'Type: first line of the message', cut short, for a one-line error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def number(text, kind=float, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    """text as a finite `kind` (int or float) in lo..hi (an end excluded if *_open); else ValueError
    saying what it must be, e.g. "must be finite, >= 0 and < 1; got 1.5"."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    bounds = ([f"{'>' if lo_open else '>='} {lo:g}"] if lo > -math.inf else []) + \
             ([f"{'<' if hi_open else '<='} {hi:g}"] if hi < math.inf else [])
    inside = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not (math.isfinite(value) and inside):
        raise ValueError(f"must be finite{', ' if bounds else ''}{' and '.join(bounds)}; got {text}")
    return value


def pick_device(name: str) -> torch.device:
    """--device auto | cpu | cuda (auto: CUDA when there is one; cuda without one: ValueError)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)
