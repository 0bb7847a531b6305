"""Generic paired arrays, and the checks and splitting every real-data loader shares.

Spec (after "arrays:"; the shortcuts on the left need no "arrays:" prefix):

    pairs.npz  or  pairs.pt    file=pairs.npz: arrays a, b, optional b_to_a (N_b,) int (the
                               audio row of each B row), optional a_ids / b_ids
    audio.npy,text.npy         a=audio.npy,b=text.npy: paired row for row
    a=audio.npz,b=text.npz     each file's one array (or a_key= / b_key=); when both files
                               also hold an `ids` array, rows are paired by id
    ids=meta.csv,id_col=ytid   one id per row for both files (a CSV, JSON or .txt list);
                               or a_ids= / b_ids= separately. Repeated audio rows (one per
                               caption) are merged, after checking they hold the same vector
    per_a=5                    contiguous: B rows 5d..5d+4 belong to A row d (auto: N_b / N_a)
    split_col=split            each id's split (train/val/test) from that column of the ids CSV
    val=0.1,test=0.1           hash-split fractions when the files give no split
    drop_bad=1                 drop NaN/Inf/all-zero rows (default: an error naming them)
    drop_unpaired=1            drop ids found on one side only (default: an error naming them)

Rows are L2-normalised on load; the norms they had are reported. Splits are made per audio
item by a stable hash of its id (its row number when there are no ids), so adding data never
moves existing items. .npy files over 256 MB are memory-mapped, never read whole: splits then
hold lazy Rows and a training batch reads only its own rows.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .base import DataError, Dataset, Rows, Split, read_rows

SPLITS = ("train", "val", "test")
LAZY_BYTES = 256 * 2**20   # .npy files larger than this are memory-mapped
CHUNK = 16384              # rows per read when scanning a file


@dataclass
class Source:
    """One modality's embeddings as found on disk, before checks."""
    name: str                              # for messages: "audio.npy", "pairs.npz['a']"
    array: np.ndarray                      # (N, D) float; np.memmap for large .npy files
    ids: Optional[list[str]] = None        # one id per row, or None (the row number is the id)
    split: Optional[list[str]] = None      # one split name per row when the files give it


# ----------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------

def _need_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")


def read_array(path: str, key: Optional[str] = None) -> np.ndarray:
    """A .npy file's array (memory-mapped when large), or the array `key` of a .npz / .pt file."""
    return read_named(path, [key])[key] if key else read_named(path, None)[None]


def read_named(path: str, keys: Optional[list[str]]) -> dict:
    """{key: array} for the keys asked for, other keys in the file mapped to None (.pt: loaded).

    keys None reads a .npy file's one array, under the key None.
    """
    _need_file(path)
    try:
        if path.endswith(".pt"):
            if keys is None:
                raise DataError(f"{path}: a .pt dict of arrays; name the array to use (or save a .npy)")
            found = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(found, dict):
                raise DataError(f"{path}: expected a dict of arrays, found {type(found).__name__}")
            found = {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in found.items()}
        else:
            mmap = "r" if keys is None and os.path.getsize(path) > LAZY_BYTES else None
            z = np.load(path, mmap_mode=mmap, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                if keys is not None:
                    raise DataError(f"{path}: a single array, but keys {keys} were asked for (use a .npz)")
                return {None: z}
            with z:
                if keys is None:
                    raise DataError(f"{path}: an archive of several arrays ({', '.join(z.files)}); name one")
                found = {k: (z[k] if k in keys else None) for k in z.files}
    except DataError:
        raise
    except (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    missing = [k for k in (keys or []) if k not in found]
    if missing:
        raise DataError(f"{path}: no array {missing[0]!r} (found: {', '.join(map(str, found)) or 'none'})")
    return found


def read_keys(path: str, required: list[str], optional: tuple = ()) -> dict:
    """read_named, plus the `optional` keys the file has; every array is read once."""
    found = read_named(path, required)          # other keys are listed with value None
    extra = [k for k in optional if k in found and found[k] is None]
    if extra:
        more = read_named(path, extra)
        found.update({k: more[k] for k in extra})
    return found


def read_one(path: str, key: Optional[str]) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """(embeddings, ids or None, name) from a .npy, or from a .npz / .pt holding one array (+ `ids`)."""
    if path.endswith(".npy"):
        return read_named(path, None)[None], None, path
    found = read_keys(path, [key] if key else [], ("ids",))
    if key is None:
        names = [k for k in found if k not in ("ids", "encoder")]   # "encoder": extract.py's caches
        if len(names) != 1:
            raise DataError(f"{path}: holds {', '.join(names) or 'no arrays'}; choose one with a_key= / b_key=")
        key = names[0]
        if found[key] is None:
            found[key] = read_named(path, [key])[key]
    return found[key], found.get("ids"), f"{path}['{key}']"


def read_ids(path: str, column: Optional[str] = None) -> tuple[list[str], dict[str, list[str]]]:
    """Ids from a .txt (one per line), .csv (column, default the first) or .json file.

    Returns (ids, all columns) so callers can also read e.g. a split column.
    """
    _need_file(path)
    try:
        with open(path, newline="") as f:
            if path.endswith(".csv"):
                rows = list(csv.DictReader(f))
                cols = {c: [r[c] for r in rows] for c in (rows[0].keys() if rows else [])}
            elif path.endswith(".json"):
                obj = json.load(f)
                if isinstance(obj, dict):
                    cols = {k: list(map(str, v)) for k, v in obj.items()}
                elif obj and isinstance(obj[0], dict):
                    cols = {c: [str(r.get(c)) for r in obj] for c in obj[0]}
                else:
                    cols = {"id": list(map(str, obj))}
            else:
                cols = {"id": [line.strip() for line in f if line.strip()]}
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ids ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not cols:
        raise DataError(f"{path}: no ids")
    column = column or next(iter(cols))
    if column not in cols:
        raise DataError(f"{path}: no column {column!r} (found: {', '.join(cols)})")
    return cols[column], cols


# ----------------------------------------------------------------------------------------
# Checks (streamed in chunks: a memory-mapped file is never read whole)
# ----------------------------------------------------------------------------------------

def check_source(src: Source) -> tuple[np.ndarray, np.ndarray]:
    """Validate dtype and shape; return (bad row indices, norms of the good rows)."""
    x = src.array
    if x.dtype.kind != "f":
        raise DataError(f"{src.name}: dtype {x.dtype} is not floating point")
    if x.ndim != 2:
        raise DataError(f"{src.name}: expected shape (N, D), got {x.shape}")
    if len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{src.name}: empty array of shape {x.shape}")
    if src.ids is not None and len(src.ids) != len(x):
        raise DataError(f"{src.name}: {len(x)} rows but {len(src.ids)} ids")
    bad, norms = [], []
    for start in range(0, len(x), CHUNK):
        c = read_rows(x, np.arange(start, min(start + CHUNK, len(x)))).astype(np.float64)
        n = np.linalg.norm(c, axis=1)
        ok = np.isfinite(c).all(1) & (n > 0)
        bad.append(np.flatnonzero(~ok) + start)
        norms.append(n[ok])
    return np.concatenate(bad), np.concatenate(norms)


def bad_rows_message(src: Source, bad: np.ndarray, hint: str = "; fix them or pass drop_bad=1") -> str:
    x = read_rows(src.array, bad[:5]).astype(np.float64)
    kind = ["NaN or Inf" if not np.isfinite(r).all() else "all zeros" for r in x]
    shown = ", ".join(f"{int(i)} ({k})" for i, k in zip(bad[:5], kind))
    return f"{src.name}: {len(bad)} bad rows: {shown}{' ...' if len(bad) > 5 else ''}{hint}"


def check_embeddings(x: np.ndarray, where: str) -> torch.Tensor:
    """Validate an in-memory (N, D) float array and return it L2-normalised as float32."""
    src = Source(where, np.asarray(x))
    bad, _ = check_source(src)
    if len(bad):
        raise DataError(bad_rows_message(src, bad, hint=""))
    return torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=1)


def norm_note(name: str, norms: np.ndarray) -> str:
    if np.abs(norms - 1).max() < 1e-3:
        return f"{name} already unit-norm"
    return f"{name} norms {norms.min():.3g}/{norms.mean():.3g}/{norms.max():.3g} (min/mean/max) before normalising"


# ----------------------------------------------------------------------------------------
# Pairing and splitting
# ----------------------------------------------------------------------------------------

def id_hash(item_id: str) -> int:
    """A stable 64-bit hash of an id (Python's hash() of a str changes with every process)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")


def split_of(ids: list[str], val: float = 0.1, test: float = 0.1) -> np.ndarray:
    """0/1/2 (train/val/test) per id from a stable hash: adding ids never moves existing ones."""
    u = np.array([id_hash(i) / 2**64 for i in ids])
    return (u >= 1 - val - test).astype(np.int64) + (u >= 1 - test).astype(np.int64)


def _examples(items) -> str:
    items = list(items)
    return ", ".join(map(repr, items[:3])) + (" ..." if len(items) > 3 else "")


def pair_by_ids(a: Source, b: Source, keep_a: np.ndarray, keep_b: np.ndarray, drop_unpaired: bool):
    """Merge repeated A ids, match B rows to A by id -> (A rows kept, B rows kept, b_to_a, note)."""
    first, dupes = {}, []
    for row in keep_a:
        i = a.ids[row]
        if i in first:
            dupes.append((first[i], row))
        else:
            first[i] = row
    if dupes:  # repeated rows must hold the same vector (one audio repeated once per caption)
        r0, r1 = np.array(dupes).T
        x0, x1 = (read_rows(a.array, r).astype(np.float64) for r in (r0, r1))
        diff = np.flatnonzero(~np.isclose(x0, x1, rtol=1e-5, atol=1e-6).all(1))
        if len(diff):
            j = diff[0]
            raise DataError(f"{a.name}: id {a.ids[r0[j]]!r} appears at rows {r0[j]} and {r1[j]} with different "
                            f"vectors ({len(diff)} such ids)")
    a_rows = np.array(list(first.values()), dtype=np.int64)
    position = {i: k for k, i in enumerate(first)}
    b_to_a = np.array([position.get(b.ids[r], -1) for r in keep_b], dtype=np.int64)
    orphans_b = sorted({b.ids[r] for r in keep_b[b_to_a < 0]})
    orphans_a = sorted(set(first) - {b.ids[r] for r in keep_b})
    note = ""
    if orphans_a or orphans_b:
        if not drop_unpaired:
            side = (f"{len(orphans_b)} ids in {b.name} have no row in {a.name} (e.g. {_examples(orphans_b)})"
                    if orphans_b else f"{len(orphans_a)} ids in {a.name} have no row in {b.name} (e.g. {_examples(orphans_a)})")
            raise DataError(f"{side}; pass drop_unpaired=1 to drop them")
        note = f"dropped unpaired ids: {len(orphans_a)} audio, {len(orphans_b)} other"
        used = np.zeros(len(a_rows), dtype=bool)
        used[b_to_a[b_to_a >= 0]] = True
        remap = np.cumsum(used) - 1
        keep_b, b_to_a = keep_b[b_to_a >= 0], remap[b_to_a[b_to_a >= 0]]
        a_rows = a_rows[used]
    return a_rows, keep_b, b_to_a, note


def _rows(src: Source, rows: np.ndarray):
    """Split data: lazy Rows over a memory-mapped file, else a normalised float32 tensor."""
    if isinstance(src.array, np.memmap):
        return Rows(src.array, rows)
    return torch.nn.functional.normalize(torch.from_numpy(np.asarray(src.array[rows], dtype=np.float32)), dim=1)


def assemble(pair: str, spec: str, a: Source, b: Source, opts: dict, b_to_a: Optional[np.ndarray] = None) -> Dataset:
    """Check two sources, pair them (b_to_a, ids, or row for row), split and normalise.

    opts: drop_bad, drop_unpaired, val, test (see the module docstring).
    """
    drop_bad, drop_unpaired = opt_flag(opts, "drop_bad"), opt_flag(opts, "drop_unpaired")
    val, test = opt_float(opts, "val", 0.1), opt_float(opts, "test", 0.1)
    notes, keep = [], {}
    for name, src in (("audio", a), (pair.split("-")[1], b)):
        bad, norms = check_source(src)
        if len(bad) and not drop_bad:
            raise DataError(bad_rows_message(src, bad))
        if len(bad):
            notes.append(f"dropped {len(bad)} bad {name} rows")
        keep[name] = np.setdiff1d(np.arange(len(src.array)), bad)
        notes.append(norm_note(name, norms))
    keep_a, keep_b = keep.values()
    if b_to_a is not None:
        if b_to_a.dtype.kind not in "iu" or b_to_a.shape != (len(b.array),):
            raise DataError(f"{spec}: b_to_a must be {len(b.array)} integers, got dtype {b_to_a.dtype} shape {b_to_a.shape}")
        out = np.flatnonzero((b_to_a < 0) | (b_to_a >= len(a.array)))
        if len(out):
            raise DataError(f"{spec}: b_to_a row {out[0]} points to audio row {b_to_a[out[0]]}, but there are "
                            f"{len(a.array)} audio rows")
    if a.ids is None and b.ids is None:   # pair by position / b_to_a, with the row number as id
        if b_to_a is None and len(a.array) != len(b.array):
            raise DataError(f"{b.name}: {len(b.array)} rows but {a.name} has {len(a.array)}; pair them with ids, "
                            f"b_to_a or per_a")
        a.ids = [str(i) for i in range(len(a.array))]
        b.ids = [a.ids[i] for i in (b_to_a if b_to_a is not None else range(len(b.array)))]
    elif a.ids is None or b.ids is None:
        raise DataError(f"{(b if a.ids is None else a).name}: has no ids while {(a if a.ids is None else b).name} has; "
                        f"give ids for both")
    a_rows, b_rows, local, note = pair_by_ids(a, b, keep_a, keep_b, drop_unpaired or drop_bad)
    notes += [note] if note else []
    if a.split is not None:
        named = [a.split[r] for r in a_rows]
        wrong = sorted(set(named) - set(SPLITS))
        if wrong:
            raise DataError(f"{spec}: unknown split name {wrong[0]!r} (use train, val, test)")
        owner = np.array([SPLITS.index(s) for s in named])
    else:
        owner = split_of([a.ids[r] for r in a_rows], val, test)
    splits = {}
    for k, name in enumerate(SPLITS):
        mine = np.flatnonzero(owner == k)
        pos = np.full(len(a_rows), -1)
        pos[mine] = np.arange(len(mine))
        in_b = np.flatnonzero(owner[local] == k)
        if len(mine) == 0 or len(in_b) == 0:
            raise DataError(f"{spec}: the {name} split is empty ({len(a_rows)} audio items are too few for "
                            f"val={val}, test={test})")
        splits[name] = Split(a=_rows(a, a_rows[mine]), b=_rows(b, b_rows[in_b]), b_to_a=torch.from_numpy(pos[local[in_b]]),
                             a_ids=[a.ids[r] for r in a_rows[mine]], b_ids=[b.ids[r] for r in b_rows[in_b]])
    return Dataset(pair=pair, spec=spec, splits=splits, notes="; ".join(notes))


# ----------------------------------------------------------------------------------------
# Options and the loader
# ----------------------------------------------------------------------------------------

def opt_flag(opts: dict, key: str) -> bool:
    return str(opts.get(key, "0")).lower() in ("1", "true", "yes")


def opt_float(opts: dict, key: str, default: float) -> float:
    try:
        return float(opts.get(key, default))
    except ValueError:
        raise DataError(f"option {key}={opts[key]!r} needs a number") from None


def apply_ids(opts: dict, a: Source, b: Source) -> None:
    """ids= / a_ids= / b_ids= (and split_col=, a column of the audio ids' CSV) from CSV, JSON or .txt."""
    col, audio_cols = opts.get("id_col"), None
    if "ids" in opts:                       # one id list for both files
        a.ids, audio_cols = read_ids(opts["ids"], col)
        b.ids = a.ids
    if "a_ids" in opts:
        a.ids, audio_cols = read_ids(opts["a_ids"], col)
    if "b_ids" in opts:
        b.ids, _ = read_ids(opts["b_ids"], col)
    if "split_col" in opts:
        path = opts.get("a_ids") or opts.get("ids")
        if audio_cols is None:
            raise DataError("split_col= needs ids= or a_ids= (the CSV that holds the column)")
        if opts["split_col"] not in audio_cols:
            raise DataError(f"{path}: no column {opts['split_col']!r} (found: {', '.join(audio_cols)})")
        a.split = audio_cols[opts["split_col"]]


def load_arrays(opts: dict, pair: str, spec: str) -> Dataset:
    b_to_a = None
    if "file" in opts:
        path = opts["file"]
        keys = [opts.get("a_key", "a"), opts.get("b_key", "b")]
        found = read_keys(path, keys, ("b_to_a", "a_ids", "b_ids"))
        a = Source(f"{path}['{keys[0]}']", found[keys[0]])
        b = Source(f"{path}['{keys[1]}']", found[keys[1]])
        b_to_a = found.get("b_to_a")
        for src, k in ((a, "a_ids"), (b, "b_ids")):
            if found.get(k) is not None:
                src.ids = [str(i) for i in found[k]]
    elif "a" in opts and "b" in opts:
        (xa, ia, na), (xb, ib, nb) = read_one(opts["a"], opts.get("a_key")), read_one(opts["b"], opts.get("b_key"))
        a = Source(na, xa, None if ia is None else [str(i) for i in ia])
        b = Source(nb, xb, None if ib is None else [str(i) for i in ib])
    else:
        raise DataError(f"{spec}: give file=PATH, or a=PATH,b=PATH")
    apply_ids(opts, a, b)
    if opts.get("per_a") == "auto" and a.ids is None and b.ids is None:  # clap: captions contiguous
        if len(b.array) % len(a.array):
            raise DataError(f"{b.name}: {len(b.array)} captions for {len(a.array)} audio rows is not a whole number "
                            f"per audio; give text_ids= (caption -> audio id) or per_audio=")
        opts = {**opts, "per_a": str(len(b.array) // len(a.array))}
    if "per_a" in opts and opts["per_a"] != "auto":
        k = int(opt_float(opts, "per_a", 1))
        if len(b.array) != k * len(a.array):
            raise DataError(f"{b.name}: {len(b.array)} rows, but per_a={k} needs {k} x {len(a.array)} = "
                            f"{k * len(a.array)} (rows 5d..5d+4 belong to audio row d)")
        b_to_a = np.arange(len(b.array)) // k
    return assemble(pair, spec, a, b, opts, b_to_a)
