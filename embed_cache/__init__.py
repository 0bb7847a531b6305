"""Pluggable loaders for pre-extracted embeddings, keyed by format name.

A data spec is "FORMAT:key=value,key=value" (or a JSON file {"format": ..., "key": value}):

    synthetic[:seed=3,n_train=5000]                the built-in default (synthetic.py)
    arrays:a=audio.npy,b=video.npy[,ids=meta.csv]  paired arrays (arrays.py; shortcuts:
                                                   pairs.npz, pairs.pt, audio.npy,video.npy)
    clap:audio=audio.npy,text=text.npy             LAION-CLAP / MS-CLAP (clap.py)
    cavp:video=ROOT,audio=ROOT                     Diff-Foley CAVP per-clip files (folders.py)
    dirs:a=FOLDER,b=FOLDER                         a folder of per-id files per modality

Adding a format is one function (opts: dict, pair: str, spec: str) -> Dataset added to
LOADERS. Every loader validates before returning and raises DataError with one line naming
the file, the row or key and the problem; the spec string is stored in checkpoints.
"""
from __future__ import annotations

import json
import os

from .arrays import load_arrays
from .base import DataError, Dataset, Rows, Split
from .clap import load_clap
from .folders import load_cavp, load_dirs
from .synthetic import SyntheticConfig, SyntheticSpace, synthetic_dataset


def _load_synthetic(opts: dict, pair: str, spec: str) -> Dataset:
    typed = {}
    for key, value in opts.items():
        if key not in SyntheticConfig.__dataclass_fields__:
            raise DataError(f"{spec}: unknown synthetic option {key!r}")
        try:
            typed[key] = type(getattr(SyntheticConfig, key))(value)
        except ValueError:
            raise DataError(f"{spec}: option {key!r} needs a number, got {value!r}") from None
    return synthetic_dataset(pair, **typed)


LOADERS = {"synthetic": _load_synthetic, "arrays": load_arrays, "clap": load_clap, "cavp": load_cavp,
           "dirs": load_dirs}


def parse_spec(spec: str) -> tuple[str, dict]:
    """(format name, options) from a spec string, a JSON spec file, or a path shortcut."""
    if spec.endswith(".json") and os.path.isfile(spec):
        try:
            with open(spec) as f:
                obj = json.load(f)
            return obj.pop("format"), {k: str(v) for k, v in obj.items()}
        except (ValueError, KeyError, AttributeError) as e:
            raise DataError(f"{spec}: not a JSON data spec {{\"format\": ..., ...}} ({type(e).__name__})") from None
    name, sep, rest = spec.partition(":")
    if sep and name in LOADERS:
        opts = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise DataError(f"{spec}: option {item!r} is not key=value")
            opts[key.strip()] = value.strip()
        return name, opts
    if spec in LOADERS:
        return spec, {}
    if "," in spec:  # two .npy files paired row for row
        a, b = (p.strip() for p in spec.split(",", 1))
        return "arrays", {"a": a, "b": b}
    if spec.endswith((".npz", ".pt")):
        return "arrays", {"file": spec}
    raise DataError(f"{spec}: not a data spec; use one of {', '.join(LOADERS)} (FORMAT:key=value,...), "
                    f"a .npz / .pt file, A.npy,B.npy, or a .json spec")


def load(spec: str, pair: str) -> Dataset:
    """Load and validate a dataset from a spec; raises DataError with a one-line message."""
    name, opts = parse_spec(spec)
    ds = LOADERS[name](opts, pair, spec)
    ds.spec = spec
    return ds


__all__ = ["DataError", "Dataset", "Split", "Rows", "LOADERS", "load", "parse_spec", "synthetic_dataset",
           "SyntheticSpace", "SyntheticConfig"]
