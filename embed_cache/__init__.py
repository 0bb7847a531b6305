"""Pluggable loaders for pre-extracted embeddings, keyed by format name.

    load("synthetic", pair)            the built-in synthetic default (also "synthetic:seed=3")
    load("pairs.npz", pair)            plain arrays; see arrays.py
    load("audio.npy,video.npy", pair)

Adding a format is one function `(spec, pair) -> Dataset` added to LOADERS; a spec written
"name:rest" picks LOADERS[name] explicitly.
"""
from __future__ import annotations

from .arrays import load_arrays
from .base import DataError, Dataset, Split
from .synthetic import SyntheticConfig, SyntheticSpace, synthetic_dataset


def _load_synthetic(spec: str, pair: str) -> Dataset:
    opts = {}
    for item in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        if key not in SyntheticConfig.__dataclass_fields__:
            raise DataError(f"{spec}: unknown synthetic option {key!r}")
        try:
            opts[key] = type(getattr(SyntheticConfig, key))(value)
        except ValueError:
            raise DataError(f"{spec}: option {key!r} needs a number, got {value!r}") from None
    return synthetic_dataset(pair, **opts)


LOADERS = {"synthetic": _load_synthetic, "arrays": lambda spec, pair: load_arrays(spec.partition(":")[2], pair)}


def load(spec: str, pair: str) -> Dataset:
    """Load a dataset from a spec string; raises DataError with a one-line message."""
    name = spec.partition(":")[0]
    if name in LOADERS:
        ds = LOADERS[name](spec, pair)
    else:
        ds = load_arrays(spec, pair)
    ds.spec = spec
    return ds


__all__ = ["DataError", "Dataset", "Split", "LOADERS", "load", "synthetic_dataset", "SyntheticSpace", "SyntheticConfig"]
