"""Plain paired arrays: one .npz holding `a`, `b` (and optionally `b_to_a`), or two .npy files.

    --data pairs.npz          a (N_a, D_A) audio, b (N_b, D_B) video/text,
                              b_to_a (N_b,) int: the audio row of each B row (default: row i
                              pairs with row i, which needs N_a == N_b)
    --data audio.npy,text.npy two arrays paired row for row

Rows are L2-normalised on load. Splits are made per audio row by a fixed hash of its row
index (80/10/10), so appending rows never moves existing ones to another split.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch

from .base import DataError, Dataset, Split

FRACTIONS = (0.8, 0.9)  # cumulative: train below 0.8, val below 0.9, test above


def read_array(path: str, key: str | None = None) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        if key is None:
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(f"{path}: no array {key!r} (found: {', '.join(z.files) or 'none'})")
            return z[key]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def check_embeddings(x: np.ndarray, where: str) -> torch.Tensor:
    """Validate a (N, D) float array and return it L2-normalised as float32."""
    if x.dtype.kind != "f":
        raise DataError(f"{where}: dtype {x.dtype} is not floating point")
    if x.ndim != 2:
        raise DataError(f"{where}: expected shape (N, D), got {x.shape}")
    if len(x) == 0:
        raise DataError(f"{where}: no rows")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    bad = (~torch.isfinite(t).all(1)).nonzero().flatten()
    if len(bad):
        raise DataError(f"{where}: row {int(bad[0])} has NaN or Inf values ({len(bad)} such rows)")
    zero = (t.norm(dim=1) == 0).nonzero().flatten()
    if len(zero):
        raise DataError(f"{where}: row {int(zero[0])} is all zeros ({len(zero)} such rows)")
    return torch.nn.functional.normalize(t, dim=1)


def split_of(index: torch.Tensor) -> torch.Tensor:
    """0/1/2 (train/val/test) for each audio row index, from a fixed multiplicative hash."""
    u = ((index.long() * 2654435761) % 2**32).double() / 2**32
    return (u >= FRACTIONS[0]).long() + (u >= FRACTIONS[1]).long()


def load_arrays(spec: str, pair: str) -> Dataset:
    if "," in spec:
        pa, pb = [p.strip() for p in spec.split(",", 1)]
        a, b = check_embeddings(read_array(pa), pa), check_embeddings(read_array(pb), pb)
        if len(a) != len(b):
            raise DataError(f"{pb}: {len(b)} rows but {pa} has {len(a)}; two .npy files are paired row for row")
        b_to_a = torch.arange(len(a))
    else:
        a = check_embeddings(read_array(spec, "a"), f"{spec}['a']")
        b = check_embeddings(read_array(spec, "b"), f"{spec}['b']")
        with np.load(spec, allow_pickle=False) as z:
            has_map = "b_to_a" in z.files
        if has_map:
            m = read_array(spec, "b_to_a")
            if m.dtype.kind not in "iu" or m.shape != (len(b),):
                raise DataError(f"{spec}['b_to_a']: expected {len(b)} integers, got dtype {m.dtype} shape {m.shape}")
            b_to_a = torch.from_numpy(m.astype(np.int64))
            out = ((b_to_a < 0) | (b_to_a >= len(a))).nonzero().flatten()
            if len(out):
                i = int(out[0])
                raise DataError(f"{spec}['b_to_a']: row {i} points to audio row {int(b_to_a[i])}, but 'a' has {len(a)} rows")
        elif len(a) != len(b):
            raise DataError(f"{spec}: 'a' has {len(a)} rows and 'b' {len(b)}; add 'b_to_a' to pair them")
        else:
            b_to_a = torch.arange(len(a))
    owner = split_of(torch.arange(len(a)))
    splits = {}
    for k, name in enumerate(("train", "val", "test")):
        rows_a = (owner == k).nonzero().flatten()
        rows_b = (owner[b_to_a] == k).nonzero().flatten()
        if len(rows_a) == 0 or len(rows_b) == 0:
            raise DataError(f"{spec}: the {name} split is empty ({len(a)} audio rows are too few to split 80/10/10)")
        new_index = torch.full((len(a),), -1, dtype=torch.long)
        new_index[rows_a] = torch.arange(len(rows_a))
        splits[name] = Split(a=a[rows_a], b=b[rows_b], b_to_a=new_index[b_to_a[rows_b]])
    return Dataset(pair=pair, spec=spec, splits=splits)
