"""Per-clip feature files: "dirs" (a folder of <id>.npy / <id>.npz per modality) and Diff-Foley's CAVP
layout ("cavp": ROOT/{Train,Test}/<id>.npz, `feat` (L, 512) at 4 fps, ids listed in Train.txt / Test.txt).
Features (L, D) are pooled to one vector per clip: pool=mean, frames:N (N evenly spaced frames,
concatenated) or seconds:N (the mean of each of the first N seconds of fps frames, concatenated)."""
from __future__ import annotations

import os

import numpy as np

from .arrays import Source, assemble, read_array, read_ids
from .base import DataError, Dataset


def parse_pool(text: str) -> str:
    """The pool= option: mean, frames:N or seconds:N with N >= 1; else ValueError."""
    kind, _, n = text.partition(":")
    if not (text == "mean" or kind in ("frames", "seconds") and n.isdigit() and int(n) >= 1):
        raise ValueError(f"use mean, frames:N or seconds:N; got {text!r}")
    return text


def pool(x: np.ndarray, how: str, fps: int, where: str) -> np.ndarray:
    """(L, D) or (D,) features -> one vector (a parse_pool value)."""
    if x.ndim == 1:
        return x
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"{where}: expected features of shape (L, D) or (D,), got {x.shape}")
    if how == "mean":
        return x.mean(0)
    kind, n = how.split(":")[0], int(how.split(":")[1])
    need = n if kind == "frames" else n * fps
    if len(x) < need:
        raise DataError(f"{where}: {len(x)} frames, but pool={how} needs {need}")
    if kind == "frames":
        return x[np.linspace(0, len(x) - 1, n).round().astype(int)].reshape(-1)
    return x[:need].reshape(n, fps, -1).mean(1).reshape(-1)


def read_folder(folder: str, opts: dict, only: set | None = None) -> dict[str, np.ndarray]:
    """{id: pooled vector} of a folder's .npy / .npz files (of the ids in `only`); an id with two is refused."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    out, dim, seen = {}, None, {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext not in (".npy", ".npz") or (only is not None and stem not in only):
            continue
        if stem in seen:
            raise DataError(f"{folder}: id {stem!r} has two files ({seen[stem]}, {name}); keep one")
        seen[stem], path = name, os.path.join(folder, name)
        x = read_array(path, opts.get("key", "feat") if ext == ".npz" else None)
        if x.dtype.kind != "f":
            raise DataError(f"{path}: dtype {x.dtype} is not floating point")
        v = pool(np.asarray(x, dtype=np.float32), opts.get("pool", "mean"), opts.get("fps", 4), path)
        if dim is not None and v.shape != dim:
            raise DataError(f"{path}: pooled shape {v.shape}, but earlier files in {folder} give {dim}")
        dim, out[stem] = v.shape, v
    if not out:
        raise DataError(f"{folder}: no .npy or .npz feature files" + (" for the listed ids" if only else ""))
    return out


def source(name: str, clips: dict[str, np.ndarray], split: dict[str, str] | None = None) -> Source:
    ids = list(clips)
    return Source(name, np.stack([clips[i] for i in ids]), ids, [split[i] for i in ids] if split else None)


def load_dirs(opts: dict, pair: str, spec: str) -> Dataset:
    if "a" not in opts or "b" not in opts:
        raise DataError(f"{spec}: give a=FOLDER,b=FOLDER")
    return assemble(pair, spec, *(source(opts[k], read_folder(opts[k], opts)) for k in "ab"), opts)


def load_cavp(opts: dict, pair: str, spec: str) -> Dataset:
    """Test/ is the test split; val comes out of Train/ by the id's hash. A clip is in one split and read
    from its files: an id in both lists, with files in both parts, or audio and video apart is refused."""
    if pair != "audio-video":
        raise DataError(f"{spec}: CAVP features are audio-video; use --pair audio-video")
    if "video" not in opts or "audio" not in opts:
        raise DataError(f"{spec}: give video=ROOT,audio=ROOT (each with Train/ and Test/ folders)")
    lists = opts.get("lists", opts["video"])
    listed = {part: set(read_ids(path)[0]) if os.path.isfile(path := os.path.join(lists, f"{part}.txt")) else None
              for part in ("Train", "Test")}
    both = sorted((listed["Train"] or set()) & (listed["Test"] or set()))
    if both:
        raise DataError(f"{os.path.join(lists, 'Train.txt')} and Test.txt both list {len(both)} ids (e.g. "
                        f"{', '.join(map(repr, both[:3]))}); a clip belongs to one split: remove them from one list")
    clips, part_of = {"audio": {}, "video": {}}, {"audio": {}, "video": {}}
    for part in ("Train", "Test"):
        for modality in clips:
            folder = os.path.join(opts[modality], part)
            if not os.path.isdir(folder):
                continue
            for clip_id, vector in read_folder(folder, opts, listed[part]).items():
                if clip_id in clips[modality]:
                    raise DataError(f"{opts[modality]}: clip {clip_id!r} has files in both Train/ and Test/; "
                                    f"a clip belongs to one split: keep one")
                clips[modality][clip_id], part_of[modality][clip_id] = vector, part
    for part, ids in listed.items():   # a listed id with no file: a truncated or mistyped list, or a missing file
        absent = sorted((ids or set()) - set(part_of["audio"]) - set(part_of["video"]))
        if absent and not opts.get("drop_unpaired", False):
            raise DataError(f"{os.path.join(lists, part + '.txt')}: {len(absent)} listed ids have no feature file under "
                            f"{part}/ (e.g. {', '.join(map(repr, absent[:3]))}); pass drop_unpaired=1 to skip them")
    for clip_id, part in part_of["audio"].items():
        other = part_of["video"].get(clip_id, part)
        if other != part:
            raise DataError(f"clip {clip_id!r}: audio under {os.path.join(opts['audio'], part)}, video under "
                            f"{os.path.join(opts['video'], other)}; a clip's features come from one split's files")
    split = {i: ("test" if p == "Test" else None) for m in part_of.values() for i, p in m.items()}   # None: by hash
    return assemble(pair, spec, source(opts["audio"], clips["audio"], split),
                    source(opts["video"], clips["video"], split), {**opts, "test": 0.0})   # the hash carves only val
