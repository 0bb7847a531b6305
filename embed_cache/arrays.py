"""Generic paired arrays, and the checks and splitting every real-data loader shares.

Spec (after "arrays:"; the shortcuts on the left need no "arrays:" prefix):

    pairs.npz  or  pairs.pt    file=pairs.npz: arrays a, b, optional b_to_a (N_b,) int (the
                               audio row of each B row), optional a_ids / b_ids; a .pt written
                               by torch.save may hold tensors or numpy arrays (read without
                               running code; a plain pickle is refused)
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
moves existing items. One clip is one item in one split: without ids, identical audio rows are
one clip (an export that repeats the audio row once per caption), merged as repeated ids are;
items that share an identical audio or B row are kept in one split. Every file that cannot be
used is a DataError with one line naming it, never a traceback. .npy files over 256 MB are
memory-mapped, never read whole: splits then hold lazy Rows and a training batch reads only
its own rows.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import pickle
import re
import warnings
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
    split: Optional[list] = None           # one split name per row when the files give it (None: by hash)
    ids_from: Optional[str] = None         # the file the ids came from, when not the array's own file


# ----------------------------------------------------------------------------------------
# Reading files: every failure is a DataError naming the file, never a traceback
# ----------------------------------------------------------------------------------------

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")   # a zip with members, an empty zip


def _need_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")


def _reason(e: BaseException) -> str:
    """'Type: first line of the message' (cut short), for a one-line DataError."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def file_kind(path: str) -> str:
    """'npy', 'npz' or 'pt', from the file's first bytes: a name can mislead (torch.save to x.npz).

    torch.save writes a zip holding `<name>/data.pkl`; np.savez a zip of .npy members. A plain
    pickle (pickle.dump, or torch.save's pre-1.6 format) is refused unread: unpickling it could
    run any code it holds. Raises DataError for a missing, empty, unreadable or other file.
    """
    _need_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(NPY_MAGIC):
            return "npy"
        if head[:4] in ZIP_MAGICS:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            return "pt" if any(n.split("/")[-1] == "data.pkl" for n in names) else "npz"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"{path}: cannot read ({_reason(e)})") from None
    if not head:
        raise DataError(f"{path}: empty file")
    if head[:1] == b"\x80":   # pickle protocol 2+
        raise DataError(f"{path}: a plain pickle, which is not read (unpickling can run code in it); save the arrays "
                        f"with np.save / np.savez, or tensors and arrays with torch.save")
    raise DataError(f"{path}: not a .npy, .npz or torch.save file")


@functools.lru_cache(maxsize=None)
def _numpy_allowlist() -> tuple[tuple, tuple]:
    """(globals, named aliases) with which torch's weights-only unpickler rebuilds numpy arrays.

    torch.save of an ndarray pickles `_reconstruct(ndarray, (0,), b'b')` (numpy's
    multiarray module), then sets the array's state: a dtype made by `numpy.dtype(...)` (whose
    own state is set too, so its class must be allowed) and the raw bytes; a numpy scalar pickles
    `scalar(dtype, bytes)`. These callables build arrays from bytes and run nothing else. Only
    the dtype classes of numbers, booleans and strings are listed: an object array (dtype 'O')
    would carry arbitrary pickled objects, so it stays refused. The file names the module as
    numpy.core.multiarray (numpy 1.x) or numpy._core.multiarray (2.x), whichever wrote it; the
    aliases let either name match this numpy's functions.
    """
    rebuild, scalar = np.zeros(1).__reduce__()[0], np.float32(0).__reduce__()[0]
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgSU"}
    plain = (rebuild, scalar, np.ndarray, np.dtype, *sorted(dtypes, key=lambda t: t.__name__))
    named = tuple((fn, f"numpy.{core}.multiarray.{fn.__name__}") for fn in (rebuild, scalar) for core in ("core", "_core")
                  if fn.__module__ != f"numpy.{core}.multiarray")
    return plain, named


def _weights_only_load(path: str, allow: tuple):
    with warnings.catch_warnings():   # torch's warnings would add lines to the one-line error
        warnings.simplefilter("ignore")
        with torch.serialization.safe_globals(list(allow)):   # for this call only, not process-wide
            return torch.load(path, map_location="cpu", weights_only=True)


def load_torch_file(path: str):
    """What torch.save wrote to path, read without running code: tensors, numpy arrays of numbers
    or strings, and plain containers (torch.load(weights_only=True) plus numpy's array rebuilders,
    _numpy_allowlist). Raises DataError naming the file for anything else."""
    plain, named = _numpy_allowlist()
    try:
        try:
            return _weights_only_load(path, plain + named)
        except AttributeError as e:   # a torch whose allowlist takes no (global, name) pairs
            if "tuple" not in str(e):
                raise
            return _weights_only_load(path, plain)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>", str(e))
        what = next(filter(None, found.groups())) if found else "an object that is not plain data"
        if what.endswith(("ObjectDType", "dtype[object_]")):   # numpy 2.x, 1.x names of the object dtype's class
            what = "a numpy array of dtype object"
        raise DataError(f"{path}: holds {what}, which is not read (only tensors, numpy arrays of numbers or strings "
                        f"and plain containers are: rebuilding other objects could run code)") from None
    except Exception as e:   # a truncated or corrupt zip, an unreadable member: all mean "unreadable"
        raise DataError(f"{path}: cannot read ({_reason(e)})") from None


def _pt_value(path: str, key: str, value, needed: bool) -> Optional[np.ndarray]:
    """One value of a loaded .pt dict as a numpy array (None for one not asked for that is no array)."""
    try:
        if torch.is_tensor(value):
            value = value.detach().cpu()
            return (value.float() if value.dtype == torch.bfloat16 else value).numpy()   # numpy has no bfloat16
        return np.asarray(value)
    except Exception as e:   # a ragged list, a tensor subclass numpy cannot view
        if needed:
            raise DataError(f"{path}: {key!r} is not an array ({_reason(e)})") from None
        return None


def read_array(path: str, key: Optional[str] = None) -> np.ndarray:
    """A .npy file's array (memory-mapped when large), or the array `key` of a .npz / .pt file."""
    return read_named(path, [key])[key] if key else read_named(path, None)[None]


def read_named(path: str, keys: Optional[list[str]]) -> dict:
    """{key: array} for the keys asked for, other keys in the file mapped to None (.pt: loaded).

    keys None reads a .npy file's one array, under the key None. The format is found from the
    file's first bytes (file_kind). Every failure is a DataError with one line naming the file.
    """
    kind = file_kind(path)
    try:
        if kind == "pt":
            if keys is None:
                raise DataError(f"{path}: a .pt dict of arrays; name the array to use (or save a .npy)")
            found = load_torch_file(path)
            if not isinstance(found, dict):
                raise DataError(f"{path}: expected a dict of arrays, found {type(found).__name__}")
            found = {str(k): _pt_value(path, str(k), v, str(k) in keys) for k, v in found.items()}
        elif kind == "npy":
            if keys is not None:
                raise DataError(f"{path}: a single array, but keys {keys} were asked for (use a .npz)")
            mmap = "r" if os.path.getsize(path) > LAZY_BYTES else None
            return {None: np.load(path, mmap_mode=mmap, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as z:
                if keys is None:
                    raise DataError(f"{path}: an archive of several arrays ({', '.join(z.files)}); name one")
                found = {k: (z[k] if k in keys else None) for k in z.files}
    except DataError:
        raise
    except Exception as e:   # bad header, truncated data, corrupt member, object array: all mean "unreadable"
        raise DataError(f"{path}: cannot read ({_reason(e)})") from None
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
    if file_kind(path) == "npy":
        return read_named(path, None)[None], None, path
    found = read_keys(path, [key] if key else [], ("ids",))
    if key is None:
        # the metadata extract.py writes beside `emb`: encoder, the captions' text and number, the shard
        names = [k for k in found if k not in ("ids", "encoder", "captions", "caption_no", "shard")]
        if len(names) != 1:
            raise DataError(f"{path}: holds {', '.join(names) or 'no arrays'}; choose one with a_key= / b_key=")
        key = names[0]
        if found[key] is None:
            found[key] = read_named(path, [key])[key]
    return found[key], found.get("ids"), f"{path}['{key}']"


def read_ids(path: str, column: Optional[str] = None) -> tuple[list[str], dict[str, list[str]]]:
    """Ids from a .txt (one per line), .csv (column, default the first) or .json file.

    JSON: a list of ids, a list of objects (one per row, columns by key) or an object of
    equal-length lists (columns). Returns (ids, all columns) so callers can also read e.g. a
    split column. Every problem (unreadable, empty, ragged rows, an empty id) is a DataError
    naming the file and the row.
    """
    _need_file(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.endswith(".csv"):
                cols = _csv_columns(path, f)
            elif path.endswith(".json"):
                cols = _json_columns(path, json.load(f))
            else:
                cols = {"id": [line.strip() for line in f if line.strip()]}
    except (OSError, ValueError, csv.Error) as e:   # ValueError: bad JSON, bytes that are not UTF-8
        raise DataError(f"{path}: cannot read ids ({_reason(e)})") from None
    if not cols or not next(iter(cols.values())):
        raise DataError(f"{path}: no ids")
    column = column or next(iter(cols))
    if column not in cols:
        raise DataError(f"{path}: no column {column!r} (found: {', '.join(cols)})")
    empty = [i for i, v in enumerate(cols[column]) if not v.strip()]
    if empty:
        raise DataError(f"{path}: row {empty[0] + 1} has an empty id in column {column!r} ({len(empty)} such rows)")
    return cols[column], cols


def _csv_columns(path: str, f) -> dict[str, list[str]]:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
        return {}
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise DataError(f"{path}: the header {header} has an empty or repeated column name")
    rows = []
    for row in reader:
        if not row:               # a blank line
            continue
        if len(row) != len(header):
            raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields, the header {len(header)}")
        rows.append(row)
    return {h: [r[j] for r in rows] for j, h in enumerate(header)}


def _json_columns(path: str, obj) -> dict[str, list[str]]:
    scalar = (str, int, float)
    if isinstance(obj, list) and all(isinstance(v, scalar) for v in obj):
        return {"id": [str(v) for v in obj]}
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        keys = list(obj[0])
        for n, r in enumerate(obj):
            if list(r) != keys or not all(isinstance(v, scalar) for v in r.values()):
                raise DataError(f"{path}: row {n + 1} does not have the keys of row 1 ({', '.join(keys)}) with plain values")
        return {k: [str(r[k]) for r in obj] for k in keys}
    if isinstance(obj, dict) and all(isinstance(v, list) and all(isinstance(x, scalar) for x in v) for v in obj.values()):
        lengths = {k: len(v) for k, v in obj.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"{path}: columns of different lengths ({', '.join(f'{k}: {n}' for k, n in lengths.items())})")
        return {str(k): [str(x) for x in v] for k, v in obj.items()}
    raise DataError(f"{path}: expected a JSON list of ids, a list of objects or an object of lists, found "
                    f"{type(obj).__name__}")


# ----------------------------------------------------------------------------------------
# Checks (streamed in chunks: a memory-mapped file is never read whole)
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _multipliers(words: int) -> np.ndarray:
    """(words, 2) fixed random odd 64-bit multipliers for row_digests."""
    return np.random.default_rng(0x51DE).integers(0, 2**63, size=(words, 2), dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def row_digests(rows: np.ndarray) -> np.ndarray:
    """(n, 2) uint64: two multiply-add hashes (mod 2**64) of each row's bytes.

    Rows with the same bytes get the same digest; two different rows share one with probability
    about 2**-126, so equal digests stand for identical rows (a row repeated once per caption,
    a clip listed twice). Computed in the same pass that checks the values.
    """
    rows = np.ascontiguousarray(rows)
    width = rows.shape[1] * rows.itemsize
    word = next(w for w in (8, 4, 2, 1) if width % w == 0)
    words = rows.view(np.uint8).reshape(len(rows), width).view(f"u{word}").astype(np.uint64)
    return words @ _multipliers(words.shape[1])   # integer matmul wraps mod 2**64


def check_source(src: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate dtype and shape; return (bad row indices, norms of the good rows, row_digests (N, 2))."""
    x = src.array
    if x.dtype.kind != "f":
        raise DataError(f"{src.name}: dtype {x.dtype} is not floating point")
    if x.ndim != 2:
        raise DataError(f"{src.name}: expected shape (N, D), got {x.shape}")
    if len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{src.name}: empty array of shape {x.shape}")
    if src.ids is not None and len(src.ids) != len(x):
        raise DataError(f"{src.name}: {len(x)} rows but {len(src.ids)} ids" + (f" in {src.ids_from}" if src.ids_from else ""))
    bad, norms, digests = [], [], []
    for start in range(0, len(x), CHUNK):
        raw = read_rows(x, np.arange(start, min(start + CHUNK, len(x))))
        c = raw.astype(np.float64)
        n = np.linalg.norm(c, axis=1)
        ok = np.isfinite(c).all(1) & (n > 0)
        bad.append(np.flatnonzero(~ok) + start)
        norms.append(n[ok])
        digests.append(row_digests(raw))
    return np.concatenate(bad), np.concatenate(norms), np.concatenate(digests)


def bad_rows_message(src: Source, bad: np.ndarray, hint: str = "; fix them or pass drop_bad=1") -> str:
    x = read_rows(src.array, bad[:5]).astype(np.float64)
    kind = ["NaN or Inf" if not np.isfinite(r).all() else "all zeros" for r in x]
    named = (lambda i: f"{int(i)}") if src.ids is None else (lambda i: f"{int(i)} (id {src.ids[i]!r})")
    shown = ", ".join(f"{named(i)} ({k})" for i, k in zip(bad[:5], kind))
    return f"{src.name}: {len(bad)} bad rows: {shown}{' ...' if len(bad) > 5 else ''}{hint}"


def check_embeddings(x: np.ndarray, where: str) -> torch.Tensor:
    """Validate an in-memory (N, D) float array and return it L2-normalised as float32."""
    src = Source(where, np.asarray(x))
    bad, _, _ = check_source(src)
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


def _split_from_u(u: np.ndarray, val: float, test: float) -> np.ndarray:
    """0/1/2 (train/val/test) from uniform numbers in [0, 1): the top `test` share is test, the `val` below it val."""
    return (u >= 1 - val - test).astype(np.int64) + (u >= 1 - test).astype(np.int64)


def split_of(ids: list[str], val: float = 0.1, test: float = 0.1) -> np.ndarray:
    """0/1/2 (train/val/test) per id from a stable hash: adding ids never moves existing ones."""
    return _split_from_u(np.array([id_hash(i) / 2**64 for i in ids]), val, test)


def first_copies(digests: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(N,) for each row, the first of `rows` (sorted) with the same digest; rows not in `rows` map to themselves."""
    first = np.arange(len(digests))
    if len(rows):
        _, idx, inv = np.unique(digests[rows], axis=0, return_index=True, return_inverse=True)
        first[rows] = rows[idx][inv.reshape(-1)]
    return first


def linked_items(n_items: int, *sides: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(n_items,) a group label per item: items whose rows share a digest on any side are one group.

    sides: (digests (R, 2), item of each row (R,)) per modality. Union-find over the few links
    that identical rows make; an item with no identical row is a group of its own (label = itself).
    """
    parent = np.arange(n_items)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    linked = False
    for digests, item in sides:
        _, inv = np.unique(digests, axis=0, return_inverse=True)
        order = np.argsort(inv.reshape(-1), kind="stable")
        same = np.flatnonzero(inv.reshape(-1)[order][1:] == inv.reshape(-1)[order][:-1])
        for k in same:   # consecutive rows with one digest: join their items
            i, j = root(int(item[order[k]])), root(int(item[order[k + 1]]))
            if i != j:
                parent[max(i, j)], linked = min(i, j), True
    return np.array([root(i) for i in range(n_items)]) if linked else parent


def _examples(items) -> str:
    items = list(items)
    return ", ".join(map(repr, items[:3])) + (" ..." if len(items) > 3 else "")


def pair_by_ids(a: Source, b: Source, keep_a: np.ndarray, keep_b: np.ndarray, drop_unpaired: bool):
    """Merge repeated A ids, match B rows to A by id -> (A rows kept, B rows kept, b_to_a, note).

    Repeated A rows of one id must hold the same vector, and the same split when the files give
    splits: one clip is one item, in one split.
    """
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
        if a.split is not None:
            clash = [(p, q) for p, q in zip(r0, r1) if a.split[p] != a.split[q]]
            if clash:
                p, q = clash[0]
                raise DataError(f"{a.name}: id {a.ids[p]!r} is in split {a.split[p]!r} at row {p} and {a.split[q]!r} at "
                                f"row {q} ({len(clash)} such ids); a clip belongs to one split")
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


def split_items(ids: list[str], given: Optional[list], group: np.ndarray, val: float, test: float,
                spec: str) -> tuple[np.ndarray, str]:
    """(0/1/2 split per item, note) keeping every group (linked_items) in one split.

    given: the files' split name per item, or None per item for "by hash" (None: all by hash).
    A hashed item takes its id's stable hash (split_of); in a group, every hashed item takes
    the split of the group's given member if it has one, else of the member with the smallest
    hash, so an item alone in its group splits as it always did. Members given different
    splits by the files keep them (the files decide), and the note counts them.
    """
    n = len(ids)
    given = [None] * n if given is None else list(given)
    wrong = sorted({s for s in given if s is not None} - set(SPLITS))
    if wrong:
        raise DataError(f"{spec}: unknown split name {wrong[0]!r} (use train, val, test)")
    u = np.array([id_hash(i) / 2**64 for i in ids])
    low = np.full(n, np.inf)
    np.minimum.at(low, group, u)                      # the smallest hash in each group
    owner = _split_from_u(low[group], val, test)
    fixed = np.array([s is not None for s in given], dtype=bool)
    if fixed.any():
        named = np.array([SPLITS.index(s) if s is not None else -1 for s in given])
        of_group = np.full(n, -1)
        of_group[group[fixed]] = named[fixed]         # one given split per group (any, if they differ)
        owner = np.where(fixed, named, np.where(of_group[group] >= 0, of_group[group], owner))
    in_groups = np.bincount(group, minlength=n)[group] > 1
    if not in_groups.any():
        return owner, ""
    note = f"{int(in_groups.sum())} audio items share an identical row with another item: each such group is kept in one split"
    lo, hi = np.full(n, len(SPLITS)), np.full(n, -1)
    np.minimum.at(lo, group, owner)
    np.maximum.at(hi, group, owner)
    crossed = int((lo[group] != hi[group]).sum())
    if crossed:
        note += f", except {crossed} items whose files give different splits (kept as given)"
    return owner, note


def assemble(pair: str, spec: str, a: Source, b: Source, opts: dict, b_to_a: Optional[np.ndarray] = None) -> Dataset:
    """Check two sources, pair them (b_to_a, ids, or row for row), split and normalise.

    opts: drop_bad, drop_unpaired, val, test (see the module docstring). One clip is one item
    in one split: without ids, identical audio rows are one clip (merged, as repeated ids are);
    items that share an identical audio or B row are kept in one split (split_items).
    """
    drop_bad, drop_unpaired = opt_flag(opts, "drop_bad"), opt_flag(opts, "drop_unpaired")
    val, test = opt_float(opts, "val", 0.1), opt_float(opts, "test", 0.1)
    notes, keep, digests = [], {}, {}
    for name, src in (("audio", a), (pair.split("-")[1], b)):
        bad, norms, digests[name] = check_source(src)
        if len(bad) and not drop_bad:
            raise DataError(bad_rows_message(src, bad))
        if len(bad):
            notes.append(f"dropped {len(bad)} bad {name} rows")
        keep[name] = np.setdiff1d(np.arange(len(src.array)), bad)
        notes.append(norm_note(name, norms))
    (keep_a, keep_b), (dig_a, dig_b) = keep.values(), digests.values()
    if b_to_a is not None:
        if b_to_a.dtype.kind not in "iu" or b_to_a.shape != (len(b.array),):
            raise DataError(f"{spec}: b_to_a must be {len(b.array)} integers, got dtype {b_to_a.dtype} shape {b_to_a.shape}")
        out = np.flatnonzero((b_to_a < 0) | (b_to_a >= len(a.array)))
        if len(out):
            raise DataError(f"{spec}: b_to_a row {out[0]} points to audio row {b_to_a[out[0]]}, but there are "
                            f"{len(a.array)} audio rows")
    if b_to_a is not None and a.ids is not None and b.ids is None:   # audio ids and a row mapping
        b.ids = [a.ids[i] for i in b_to_a]
    if a.ids is None and b.ids is None:   # pair by position / b_to_a, with the row number as id
        if b_to_a is None and len(a.array) != len(b.array):
            raise DataError(f"{b.name}: {len(b.array)} rows but {a.name} has {len(a.array)}; pair them with ids, "
                            f"b_to_a or per_a")
        # Identical audio rows are one clip (an export that repeats the audio row once per
        # caption): each row's id is the row number of its first copy, so the copies merge
        # below as repeated ids do. Split independently, they would put one clip in two splits.
        first = first_copies(dig_a, keep_a)
        a.ids = [str(i) for i in first]
        b.ids = [a.ids[i] for i in (b_to_a if b_to_a is not None else range(len(b.array)))]
        merged = len(keep_a) - len(np.unique(first[keep_a]))
        if merged:
            notes.append(f"merged {merged} repeated audio rows into the first row with the same vector "
                         f"({len(keep_a) - merged} audio items)")
    elif a.ids is None or b.ids is None:
        raise DataError(f"{(b if a.ids is None else a).name}: has no ids while {(a if a.ids is None else b).name} has; "
                        f"give ids for both")
    a_rows, b_rows, local, note = pair_by_ids(a, b, keep_a, keep_b, drop_unpaired or drop_bad)
    notes += [note] if note else []
    group = linked_items(len(a_rows), (dig_a[a_rows], np.arange(len(a_rows))), (dig_b[b_rows], local))
    owner, note = split_items([a.ids[r] for r in a_rows], None if a.split is None else [a.split[r] for r in a_rows],
                              group, val, test, spec)
    notes += [note] if note else []
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
        b.ids, a.ids_from, b.ids_from = a.ids, opts["ids"], opts["ids"]
    if "a_ids" in opts:
        (a.ids, audio_cols), a.ids_from = read_ids(opts["a_ids"], col), opts["a_ids"]
    if "b_ids" in opts:
        (b.ids, _), b.ids_from = read_ids(opts["b_ids"], col), opts["b_ids"]
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
