"""Per-clip feature files: a folder per modality, and Diff-Foley's CAVP layout (DESIGN.md 5).

    dirs:a=feats/audio,b=feats/video[,key=feat,pool=mean]
        each folder holds <id>.npy or <id>.npz files (key `feat` by default), one per clip,
        shape (D,) or (L, D); the two folders are matched by id (the file name).
    cavp:video=CAVP_feat,audio=CAVP_audio[,lists=DIR,pool=mean,fps=4]
        each root holds {Train,Test}/<id>.npz with key `feat` (L, 512), per-frame unit norm,
        4 frames per second. Split lists Train.txt / Test.txt (in lists=, default the video
        root) name the ids of each split; without them the folder decides. Test is the test
        split; val is carved out of Train by a stable hash of the id (val=0.1).

DiffGAP works on one vector per clip, so temporal features (L, D) are pooled:
    pool=mean        mean over frames (default), then L2-normalised on load
    pool=frames:N    N frames evenly spaced over the clip, concatenated: (N * D,)
    pool=seconds:N   mean over each of the first N seconds (fps frames each), concatenated: (N * D,)
Clips too short for the pooling are an error naming the file.
"""
from __future__ import annotations

import os

import numpy as np

from .arrays import Source, assemble, opt_float, read_array, read_ids, split_of
from .base import DataError, Dataset


def pool(x: np.ndarray, how: str, fps: int, where: str) -> np.ndarray:
    """(L, D) or (D,) features -> one vector."""
    if x.ndim == 1:
        return x
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"{where}: expected features of shape (L, D) or (D,), got {x.shape}")
    kind, _, n = how.partition(":")
    if kind == "mean":
        return x.mean(0)
    if kind not in ("frames", "seconds") or not n.isdigit() or int(n) < 1:
        raise DataError(f"pool={how!r}: use mean, frames:N or seconds:N")
    n = int(n)
    need = n if kind == "frames" else n * fps
    if len(x) < need:
        raise DataError(f"{where}: {len(x)} frames, but pool={how} needs {need}")
    if kind == "frames":
        return x[np.linspace(0, len(x) - 1, n).round().astype(int)].reshape(-1)
    return x[:need].reshape(n, fps, -1).mean(1).reshape(-1)


def read_folder(folder: str, opts: dict, only: set | None = None) -> dict[str, np.ndarray]:
    """{id: pooled vector} for the .npy / .npz files of a folder (ids restricted to `only`)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    key, how, fps = opts.get("key", "feat"), opts.get("pool", "mean"), int(opt_float(opts, "fps", 4))
    out, dim = {}, None
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext not in (".npy", ".npz") or (only is not None and stem not in only):
            continue
        path = os.path.join(folder, name)
        x = read_array(path, key if ext == ".npz" else None)
        if x.dtype.kind != "f":
            raise DataError(f"{path}: dtype {x.dtype} is not floating point")
        v = pool(np.asarray(x, dtype=np.float32), how, fps, path)
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
    return assemble(pair, spec, source(opts["a"], read_folder(opts["a"], opts)),
                    source(opts["b"], read_folder(opts["b"], opts)), opts)


def load_cavp(opts: dict, pair: str, spec: str) -> Dataset:
    if pair != "audio-video":
        raise DataError(f"{spec}: CAVP features are audio-video; use --pair audio-video")
    if "video" not in opts or "audio" not in opts:
        raise DataError(f"{spec}: give video=ROOT,audio=ROOT (each with Train/ and Test/ folders)")
    lists = opts.get("lists", opts["video"])
    val = opt_float(opts, "val", 0.1)
    clips, split = {"audio": {}, "video": {}}, {}
    for part in ("Train", "Test"):
        listed = os.path.join(lists, f"{part}.txt")
        only = set(read_ids(listed)[0]) if os.path.isfile(listed) else None
        for modality in clips:
            folder = os.path.join(opts[modality], part)
            if os.path.isdir(folder):
                clips[modality].update(read_folder(folder, opts, only))
        new = sorted((set(clips["audio"]) | set(clips["video"])) - set(split))   # first part seen wins
        for i, s in zip(new, split_of(new, val, 0.0)):
            split[i] = "test" if part == "Test" else ("train", "val")[int(s)]
    return assemble(pair, spec, source(opts["audio"], clips["audio"], split),
                    source(opts["video"], clips["video"], split), opts)
