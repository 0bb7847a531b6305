"""The "arrays" and "clap" formats (paired .npy / .npz / .pt files), and the reading, checks, pairing and
splitting that every loader of files shares; .npy files over LAZY_BYTES are memory-mapped, never read whole."""
from __future__ import annotations

import csv
import hashlib
import io
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

from .base import DataError, Dataset, Rows, Split, read_rows, read_text, reason

SPLITS = ("train", "val", "test")
LAZY_BYTES = 256 * 2**20   # .npy files larger than this are memory-mapped
CHUNK = 16384              # rows per read when scanning a file
NPY_MAGIC, ZIP_MAGICS = b"\x93NUMPY", (b"PK\x03\x04", b"PK\x05\x06")   # a zip with members, an empty zip


@dataclass
class Source:
    """One modality's embeddings as found on disk, before checks."""
    name: str                              # for messages: "audio.npy", "pairs.npz['a']"
    array: np.ndarray                      # (N, D) float; np.memmap for large .npy files
    ids: Optional[list[str]] = None        # one id per row, or None (the row number is the id)
    split: Optional[list] = None           # one split name (or None: by hash) per row, when the files give it
    ids_from: Optional[str] = None         # the file the ids came from, when not the array's own file
    encoder: Optional[str] = None          # the model that embedded it, where the file says (extract.py caches)


# -- reading files ----------------------------------------------------------------------------
def file_kind(path: str) -> str:
    """'npy', 'npz' or 'pt' from the first bytes (torch.save: a zip holding <name>/data.pkl; np.savez: a
    zip of .npy members), as a name can mislead; a plain pickle is refused unread: it could run code."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(NPY_MAGIC):
            return "npy"
        if head[:4] in ZIP_MAGICS:
            with zipfile.ZipFile(path) as z:
                return "pt" if any(n.split("/")[-1] == "data.pkl" for n in z.namelist()) else "npz"
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"{path}: cannot read ({reason(e)})") from None
    if not head:
        raise DataError(f"{path}: empty file")
    if head[:1] == b"\x80":   # pickle protocol 2+
        raise DataError(f"{path}: a plain pickle, which is not read (unpickling can run code in it); save the arrays "
                        f"with np.save / np.savez, or tensors and arrays with torch.save")
    raise DataError(f"{path}: not a .npy, .npz or torch.save file")


def load_torch_file(path: str):
    """What torch.save wrote, read without running code: tensors, containers and numpy arrays of numbers, booleans
    or strings (their rebuilders, under numpy 1.x's or 2.x's name, allowed for this call only; not object arrays)."""
    def load(allow):
        with warnings.catch_warnings():   # torch's warnings would add lines to the one-line error
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location="cpu", weights_only=True)
    rebuild, scalar = np.zeros(1).__reduce__()[0], np.float32(0).__reduce__()[0]
    dtypes = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgSU"}, key=lambda t: t.__name__)
    plain = (rebuild, scalar, np.ndarray, np.dtype, *dtypes)
    named = tuple((fn, f"numpy.{core}.multiarray.{fn.__name__}") for fn in (rebuild, scalar) for core in ("core", "_core")
                  if fn.__module__ != f"numpy.{core}.multiarray")
    try:
        try:
            return load(plain + named)
        except AttributeError as e:   # a torch whose allowlist takes no (global, name) pairs
            if "tuple" not in str(e):
                raise
            return load(plain)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>", str(e))
        what = next(filter(None, found.groups())) if found else "an object that is not plain data"
        if what.endswith(("ObjectDType", "dtype[object_]")):   # numpy 2.x, 1.x names of the object dtype's class
            what = "a numpy array of dtype object"
        raise DataError(f"{path}: holds {what}, which is not read (only tensors, numpy arrays of numbers or strings "
                        f"and plain containers are: rebuilding other objects could run code)") from None
    except Exception as e:   # a truncated or corrupt zip, an unreadable member: all mean "unreadable"
        raise DataError(f"{path}: cannot read ({reason(e)})") from None


def read_array(path: str, key: Optional[str] = None) -> np.ndarray:
    """A .npy file's array (memory-mapped when large), or the array `key` of a .npz / .pt file."""
    return read_named(path, [key])[key] if key else read_named(path)[None]


def read_named(path: str, keys: Optional[list[str]] = None, optional: tuple = ()) -> dict:
    """{key: array} of a .npz / .pt file for `keys` and the `optional` keys it has, its other keys
    mapped to None (.pt: to their arrays); keys None: a .npy file's one array, under None."""
    kind = file_kind(path)
    try:
        if kind == "npy":
            if keys is not None:
                raise DataError(f"{path}: a single array, but keys {keys} were asked for (use a .npz)")
            return {None: np.load(path, mmap_mode="r" if os.path.getsize(path) > LAZY_BYTES else None, allow_pickle=False)}
        if kind == "pt":
            found = load_torch_file(path)
            if not isinstance(found, dict):
                raise DataError(f"{path}: expected a dict of arrays, found {type(found).__name__}")
            found = {str(k): v.detach().cpu() if torch.is_tensor(v) else v for k, v in found.items()}
            for k, v in found.items():   # as numpy arrays (none has bfloat16); None: no array, and not asked for
                try:   # a ragged list, a tensor subclass numpy cannot view: no array
                    found[k] = np.asarray(v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v)
                except Exception as e:
                    if k in (keys or ()):
                        raise DataError(f"{path}: {k!r} is not an array ({reason(e)})") from None
                    found[k] = None
        else:
            with np.load(path, allow_pickle=False) as z:
                found = {k: (z[k] if k in (keys or ()) or k in optional else None) for k in z.files}
    except DataError:
        raise
    except Exception as e:   # bad header, truncated data, corrupt member, object array: all mean "unreadable"
        raise DataError(f"{path}: cannot read ({reason(e)})") from None
    if keys is None:
        raise DataError(f"{path}: an archive of several arrays ({', '.join(found)}); name one")
    missing = [k for k in keys if k not in found]
    if missing:
        raise DataError(f"{path}: no array {missing[0]!r} (found: {', '.join(map(str, found)) or 'none'})")
    return found


def read_one(path: str, key: Optional[str]) -> Source:
    """The embeddings of a .npy, or of a .npz / .pt holding one array (or `key`) and maybe `ids`."""
    if file_kind(path) == "npy":
        return Source(path, read_named(path)[None])
    found = read_named(path, [key] if key else [], ("ids", "encoder"))
    if key is None:
        # beside `emb`, the metadata extract.py writes: encoder, the captions' text and number, the shard
        names = [k for k in found if k not in ("ids", "encoder", "captions", "caption_no", "shard")]
        if len(names) != 1:
            raise DataError(f"{path}: holds {', '.join(names) or 'no arrays'}; choose one with a_key= / b_key=")
        key = names[0]
        if found[key] is None:
            found[key] = read_named(path, [key])[key]
    ids, encoder = found.get("ids"), found.get("encoder")
    return Source(f"{path}['{key}']", found[key], None if ids is None else [str(i) for i in ids],
                  encoder=None if encoder is None else str(encoder))


def read_ids(path: str, column: Optional[str] = None) -> tuple[list[str], dict[str, list[str]]]:
    """(ids, every column) from a .txt (an id per line), .csv (column, default the first) or .json file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    text = read_text(path)
    try:
        if path.endswith(".csv"):
            cols = _csv_columns(path, io.StringIO(text, newline=""))
        elif path.endswith(".json"):
            cols = _json_columns(path, json.loads(text))
        else:
            cols = {"id": [line.strip() for line in text.splitlines() if line.strip()]}
    except (json.JSONDecodeError, csv.Error) as e:   # not DataError, a ValueError too
        raise DataError(f"{path}: cannot read ids ({reason(e)})") from None
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
    for row in filter(None, reader):   # blank lines skipped
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


# -- checks, in chunks -------------------------------------------------------------------------
def check_source(src: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check dtype and shape -> (bad rows: NaN, Inf, all zeros; norms of the good rows; (N, 2) digests:
    two hashes of each row's bytes, equal for identical rows, for different ones with p ~ 2**-126)."""
    x = src.array
    if x.dtype.kind != "f":
        raise DataError(f"{src.name}: dtype {x.dtype} is not floating point")
    if x.ndim != 2:
        raise DataError(f"{src.name}: expected shape (N, D), got {x.shape}")
    if len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{src.name}: empty array of shape {x.shape}")
    if src.ids is not None and len(src.ids) != len(x):
        raise DataError(f"{src.name}: {len(x)} rows but {len(src.ids)} ids" + (f" in {src.ids_from}" if src.ids_from else ""))
    width = x.shape[1] * x.itemsize
    word = next(w for w in (8, 4, 2, 1) if width % w == 0)
    mult = np.random.default_rng(0x51DE).integers(0, 2**63, size=(width // word, 2), dtype=np.uint64) * np.uint64(2) + 1
    bad, norms, digests = [], [], []
    for start in range(0, len(x), CHUNK):
        raw = np.ascontiguousarray(read_rows(x, np.arange(start, min(start + CHUNK, len(x)))))
        c = raw.astype(np.float64)
        n = np.linalg.norm(c, axis=1)
        ok = np.isfinite(c).all(1) & (n > 0)
        bad.append(np.flatnonzero(~ok) + start)
        norms.append(n[ok])
        words = raw.view(np.uint8).reshape(len(raw), width).view(f"u{word}").astype(np.uint64)
        digests.append(words @ mult)   # odd multipliers; the integer matmul wraps mod 2**64
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


# -- pairing and splitting ----------------------------------------------------------------------
def id_hash(item_id: str) -> int:
    """A stable 64-bit hash of an id (Python's hash() of a str changes with every process)."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")


def linked_items(n_items: int, *sides: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(n_items,) a group label (its smallest item) per item: items whose rows share a digest on any
    side are one group. sides: (digests (R, 2), item of each row (R,)); union-find over the links."""
    parent, linked = np.arange(n_items), False

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for digests, item in sides:
        inv = np.unique(digests, axis=0, return_inverse=True)[1].reshape(-1)
        order = np.argsort(inv, kind="stable")
        for k in np.flatnonzero(inv[order][1:] == inv[order][:-1]):   # consecutive rows of one digest: join their items
            i, j = root(int(item[order[k]])), root(int(item[order[k + 1]]))
            if i != j:
                parent[max(i, j)], linked = min(i, j), True
    return np.array([root(i) for i in range(n_items)]) if linked else parent


def pair_by_ids(a: Source, b: Source, keep_a: np.ndarray, keep_b: np.ndarray, drop_unpaired: bool):
    """Merge repeated A ids (an audio repeated per caption: the same vector, the same split) and
    match B rows to A by id -> (A rows kept, B rows kept, b_to_a, note)."""
    first, dupes = {}, []
    for row in keep_a:
        if first.setdefault(a.ids[row], row) != row:
            dupes.append((first[a.ids[row]], row))
    if dupes:
        r0, r1 = np.array(dupes).T
        x0, x1 = (read_rows(a.array, r).astype(np.float64) for r in (r0, r1))
        diff = np.flatnonzero(~np.isclose(x0, x1, rtol=1e-5, atol=1e-6).all(1))
        if len(diff):
            j = diff[0]
            raise DataError(f"{a.name}: id {a.ids[r0[j]]!r} appears at rows {r0[j]} and {r1[j]} with different "
                            f"vectors ({len(diff)} such ids)")
        clash = [] if a.split is None else [(p, q) for p, q in zip(r0, r1) if a.split[p] != a.split[q]]
        if clash:
            p, q = clash[0]
            raise DataError(f"{a.name}: id {a.ids[p]!r} is in split {a.split[p]!r} at row {p} and {a.split[q]!r} at "
                            f"row {q} ({len(clash)} such ids); a clip belongs to one split")
    a_rows = np.array(list(first.values()), dtype=np.int64)
    position = {i: k for k, i in enumerate(first)}
    b_to_a = np.array([position.get(b.ids[r], -1) for r in keep_b], dtype=np.int64)
    orphans_b = sorted({b.ids[r] for r in keep_b[b_to_a < 0]})
    orphans_a = sorted(set(first) - {b.ids[r] for r in keep_b})
    if not (orphans_a or orphans_b):
        return a_rows, keep_b, b_to_a, ""
    if not drop_unpaired:
        eg = lambda ids: ", ".join(map(repr, ids[:3])) + (" ..." if len(ids) > 3 else "")
        side = (f"{len(orphans_b)} ids in {b.name} have no row in {a.name} (e.g. {eg(orphans_b)})" if orphans_b else
                f"{len(orphans_a)} ids in {a.name} have no row in {b.name} (e.g. {eg(orphans_a)})")
        raise DataError(f"{side}; pass drop_unpaired=1 to drop them")
    used = np.zeros(len(a_rows), dtype=bool)
    used[b_to_a[b_to_a >= 0]] = True
    remap = np.cumsum(used) - 1
    return (a_rows[used], keep_b[b_to_a >= 0], remap[b_to_a[b_to_a >= 0]],
            f"dropped unpaired ids: {len(orphans_a)} audio, {len(orphans_b)} other")


def split_items(ids: list[str], given: Optional[list], group: np.ndarray, val: float, test: float,
                spec: str) -> tuple[np.ndarray, str]:
    """(0/1/2 = train/val/test per item, note), each group (linked_items) in one split: the files'
    split of a member (given: per item, None for "by hash"), else that of the group's smallest id
    hash u (test: u >= 1 - test, val: the `val` below). Members given different splits keep them."""
    n = len(ids)
    given = [None] * n if given is None else list(given)
    wrong = sorted({s for s in given if s is not None} - set(SPLITS))
    if wrong:
        raise DataError(f"{spec}: unknown split name {wrong[0]!r} (use train, val, test)")
    u = np.array([id_hash(i) / 2**64 for i in ids])
    low = np.full(n, np.inf)
    np.minimum.at(low, group, u)                      # the smallest hash in each group
    owner = (low[group] >= 1 - val - test).astype(np.int64) + (low[group] >= 1 - test).astype(np.int64)
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
    return owner, note + (f", except {crossed} items whose files give different splits (kept as given)" if crossed else "")


def assemble(pair: str, spec: str, a: Source, b: Source, opts: dict, b_to_a: Optional[np.ndarray] = None) -> Dataset:
    """Check two sources, pair them (by b_to_a, ids or row for row), split and normalise; opts as load() parsed them."""
    drop_bad, drop_unpaired = opts.get("drop_bad", False), opts.get("drop_unpaired", False)
    val, test = opts.get("val", 0.1), opts.get("test", 0.1)
    notes, keep, digests, b_name = [], {}, {}, pair.split("-")[1]
    for name, src in (("audio", a), (b_name, b)):
        bad, norms, digests[name] = check_source(src)
        if len(bad) and (not drop_bad or len(bad) == len(src.array)):   # nothing left to drop to
            raise DataError(bad_rows_message(src, bad))
        if len(bad):
            notes.append(f"dropped {len(bad)} bad {name} rows")
        keep[name] = np.setdiff1d(np.arange(len(src.array)), bad)
        notes.append(f"{name} already unit-norm" if np.abs(norms - 1).max() < 1e-3 else
                     f"{name} norms {norms.min():.3g}/{norms.mean():.3g}/{norms.max():.3g} (min/mean/max) before normalising")
    (keep_a, keep_b), (dig_a, dig_b) = keep.values(), digests.values()
    if b_to_a is not None:
        if b_to_a.dtype.kind not in "iu" or b_to_a.shape != (len(b.array),):
            raise DataError(f"{spec}: b_to_a must be {len(b.array)} integers, got dtype {b_to_a.dtype} shape {b_to_a.shape}")
        out = np.flatnonzero((b_to_a < 0) | (b_to_a >= len(a.array)))
        if len(out):
            raise DataError(f"{spec}: b_to_a row {out[0]} points to audio row {b_to_a[out[0]]}, but there are "
                            f"{len(a.array)} audio rows")
        if a.ids is not None and b.ids is None:   # audio ids and a row mapping
            b.ids = [a.ids[i] for i in b_to_a]
    if a.ids is None and b.ids is None:   # pair by position / b_to_a, with the row number as id
        if b_to_a is None and len(a.array) != len(b.array):
            raise DataError(f"{b.name}: {len(b.array)} rows but {a.name} has {len(a.array)}; pair them with ids, "
                            f"b_to_a or per_a")
        # Identical audio rows are one clip (an export that repeats it once per caption): a row's id
        # is the row number of its first copy, so the copies merge as repeated ids do.
        first = np.arange(len(dig_a))
        if len(keep_a):
            _, idx, inv = np.unique(dig_a[keep_a], axis=0, return_index=True, return_inverse=True)
            first[keep_a] = keep_a[idx][inv.reshape(-1)]
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
    group = linked_items(len(a_rows), (dig_a[a_rows], np.arange(len(a_rows))), (dig_b[b_rows], local))
    owner, note2 = split_items([a.ids[r] for r in a_rows], None if a.split is None else [a.split[r] for r in a_rows],
                               group, val, test, spec)
    notes += [n for n in (note, note2) if n]
    rows = lambda src, r: Rows(src.array, r) if isinstance(src.array, np.memmap) else \
        torch.nn.functional.normalize(torch.from_numpy(np.asarray(src.array[r], dtype=np.float32)), dim=1)
    splits, repeats = {}, 0
    for k, name in enumerate(SPLITS):
        mine, in_b = np.flatnonzero(owner == k), np.flatnonzero(owner[local] == k)
        if len(mine) == 0 or len(in_b) == 0:
            kept = len(np.unique(group))   # groups of items that share an identical row go to one split together
            raise DataError(f"{spec}: the {name} split is empty ({len(a_rows)} audio items are too few for val={val}, "
                            f"test={test}" + (f"; they form {kept} groups of identical rows, each kept in one split: a "
                                              f"class prompt per clip needs split_col=" if kept < len(a_rows) else "") + ")")
        pos = np.full(len(a_rows), -1)
        pos[mine] = np.arange(len(mine))
        # identical B rows (one class prompt for many clips) are one B item, numbered in order of first row
        _, first, inv = np.unique(dig_b[b_rows[in_b]], axis=0, return_index=True, return_inverse=True)
        number = np.empty(len(first), dtype=np.int64)
        number[np.argsort(first)] = np.arange(len(first))
        repeats += len(in_b) - len(first)
        splits[name] = Split(a=rows(a, a_rows[mine]), b=rows(b, b_rows[in_b]), b_to_a=torch.from_numpy(pos[local[in_b]]),
                             a_ids=[a.ids[r] for r in a_rows[mine]], b_ids=[b.ids[r] for r in b_rows[in_b]],
                             b_item=torch.from_numpy(number[inv.reshape(-1)]) if len(first) < len(in_b) else None)
    if repeats:
        notes.append(f"merged {repeats} {b_name} rows into an identical earlier row of their split: retrieval ranks the "
                     f"{sum(len(x.b_rows()) for x in splits.values())} distinct {b_name} items, each correct for all its audio")
    return Dataset(pair=pair, spec=spec, splits=splits, notes="; ".join(notes),
                   encoder=a.encoder if a.encoder == b.encoder else None)


def load_clap(opts: dict, pair: str, spec: str) -> Dataset:
    """The arrays format under CLAP's names; without ids, captions are contiguous (N_text / N_audio or per_audio=K)."""
    if pair != "audio-text":
        raise DataError(f"{spec}: CLAP embeddings are audio-text; use --pair audio-text")
    if "audio" not in opts or "text" not in opts:
        raise DataError(f"{spec}: give audio=PATH,text=PATH")
    names = {"audio": "a", "text": "b", "audio_key": "a_key", "text_key": "b_key", "audio_ids": "a_ids",
             "text_ids": "b_ids", "per_audio": "per_a"}
    opts = {names.get(k, k): v for k, v in opts.items()}
    return load_arrays(opts if {"ids", "a_ids", "b_ids", "per_a"} & set(opts) else {**opts, "per_a": "auto"}, pair, spec)


def load_arrays(opts: dict, pair: str, spec: str) -> Dataset:
    b_to_a = None
    if "file" in opts:
        path, keys = opts["file"], [opts.get("a_key", "a"), opts.get("b_key", "b")]
        found = read_named(path, keys, ("b_to_a", "a_ids", "b_ids"))
        a, b = (Source(f"{path}['{k}']", found[k], None if found.get(i) is None else [str(x) for x in found[i]])
                for k, i in zip(keys, ("a_ids", "b_ids")))
        b_to_a = found.get("b_to_a")
    elif "a" in opts and "b" in opts:
        a, b = read_one(opts["a"], opts.get("a_key")), read_one(opts["b"], opts.get("b_key"))
    else:
        raise DataError(f"{spec}: give file=PATH, or a=PATH,b=PATH")
    # ids= (both files) / a_ids= / b_ids= from CSV, JSON or .txt; split_col=: a column of the audio ids' file
    col, audio_cols = opts.get("id_col"), None
    if "ids" in opts:
        a.ids, audio_cols = read_ids(opts["ids"], col)
        b.ids, a.ids_from, b.ids_from = a.ids, opts["ids"], opts["ids"]
    if "a_ids" in opts:
        (a.ids, audio_cols), a.ids_from = read_ids(opts["a_ids"], col), opts["a_ids"]
    if "b_ids" in opts:
        (b.ids, _), b.ids_from = read_ids(opts["b_ids"], col), opts["b_ids"]
    if "split_col" in opts:
        if audio_cols is None:
            raise DataError("split_col= needs ids= or a_ids= (the CSV that holds the column)")
        if opts["split_col"] not in audio_cols:
            raise DataError(f"{opts.get('a_ids') or opts['ids']}: no column {opts['split_col']!r} "
                            f"(found: {', '.join(audio_cols)})")
        a.split = audio_cols[opts["split_col"]]
    per_a = opts.get("per_a")
    if per_a == "auto" and a.ids is None and b.ids is None:   # clap: captions contiguous, N_b / N_a per audio
        if not len(a.array) or len(b.array) % len(a.array):
            raise DataError(f"{b.name}: {len(b.array)} captions for {len(a.array)} audio rows is not a whole number "
                            f"per audio; give text_ids= (caption -> audio id) or per_audio=")
        per_a = len(b.array) // len(a.array)
    if per_a not in (None, "auto"):
        if len(b.array) != per_a * len(a.array):
            raise DataError(f"{b.name}: {len(b.array)} rows, but per_a={per_a} needs {per_a} x {len(a.array)} = "
                            f"{per_a * len(a.array)} (rows 5d..5d+4 belong to audio row d)")
        b_to_a = np.arange(len(b.array)) // per_a
    return assemble(pair, spec, a, b, opts, b_to_a)
