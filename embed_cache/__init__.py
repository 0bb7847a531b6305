"""Loaders of pre-extracted embeddings (README.md documents the formats). A data spec is "FORMAT:key=value,..."
or a path (pairs.npz, pairs.pt, audio.npy,video.npy); load() parses its options once, by OPTIONS, for the
loader in LOADERS. Every error is one DataError line naming its cause."""
from __future__ import annotations

import math
from dataclasses import fields

from .arrays import load_arrays, load_clap
from .base import DataError, Dataset, Rows, Split, number
from .folders import load_cavp, load_dirs, parse_pool
from .synthetic import PRESETS, SyntheticConfig, SyntheticSpace, synthetic_dataset


def _load_synthetic(opts: dict, pair: str, spec: str) -> Dataset:
    try:   # an unknown preset, a layout that does not fit: make_config refuses it before anything is drawn
        return synthetic_dataset(pair, **opts)
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from None


LOADERS = {"synthetic": _load_synthetic, "arrays": load_arrays, "clap": load_clap, "cavp": load_cavp, "dirs": load_dirs}


def _number(kind, lo, hi=math.inf, hi_open=False, auto=False):   # auto: "auto" is a value too
    return lambda text: text if auto and text == "auto" else number(text, kind, lo, hi, hi_open=hi_open)


def _flag(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"must be 0 or 1; got {text!r}")
    return text.lower() in ("1", "true", "yes")


# Each format's options and their parsers (text -> value, or ValueError saying what it must be).
# An unknown key is refused, not ignored: a misspelt "vall=0.2" must not silently change the split.
_FRACTION = _number(float, 0, 1, hi_open=True)
_SPLIT = {"val": _FRACTION, "test": _FRACTION, "drop_bad": _flag, "drop_unpaired": _flag}
_IDS = dict.fromkeys(("ids", "id_col", "split_col"), str)
OPTIONS = {"synthetic": {f.name: {int: _number(int, 0 if f.name == "seed" else 1), float: _number(float, 0), str: str}
                        [type(f.default)] for f in fields(SyntheticConfig)},   # counts >= 1, energies >= 0
           "arrays": {**dict.fromkeys(("file", "a", "b", "a_key", "b_key", "a_ids", "b_ids"), str),
                      "per_a": _number(int, 1, auto=True), **_IDS, **_SPLIT},
           "clap": {**dict.fromkeys(("audio", "text", "audio_key", "text_key", "audio_ids", "text_ids"), str),
                    "per_audio": _number(int, 1, auto=True), **_IDS, **_SPLIT},
           "cavp": {**dict.fromkeys(("video", "audio", "lists", "key"), str), "pool": parse_pool,
                    "fps": _number(int, 1), "val": _FRACTION, "drop_bad": _flag, "drop_unpaired": _flag},
           "dirs": {**dict.fromkeys(("a", "b", "key"), str), "pool": parse_pool, "fps": _number(int, 1), **_SPLIT}}


def parse_options(name: str, opts: dict, spec: str) -> dict:
    """A format's options as typed values; DataError naming the key of one unknown or bad."""
    table = OPTIONS[name]
    unknown = sorted(set(opts) - set(table))
    if unknown:
        raise DataError(f"{spec}: unknown {name} option {unknown[0]!r} (valid: {', '.join(sorted(table))})")
    typed = {}
    for key, text in opts.items():
        try:
            typed[key] = table[key](text)
        except ValueError as e:
            raise DataError(f"{spec}: option {key}: {e}") from None
    if "test" in table and typed.get("val", 0.1) + typed.get("test", 0.1) >= 1:
        raise DataError(f"{spec}: val + test must be below 1 (the rest is the training split)")
    return typed


def parse_spec(spec: str) -> tuple[str, dict]:
    """(format name, options as text) from a spec string or a path shortcut."""
    name, _, rest = spec.partition(":")
    if name in LOADERS:   # also a bare name: "synthetic"
        opts = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise DataError(f"{spec}: option {item!r} is not key=value")
            opts[key.strip()] = value.strip()
        return name, opts
    if "," in spec:  # two .npy files paired row for row
        a, b = (p.strip() for p in spec.split(",", 1))
        return "arrays", {"a": a, "b": b}
    if spec.endswith((".npz", ".pt")):
        return "arrays", {"file": spec}
    raise DataError(f"{spec}: not a data spec; use one of {', '.join(LOADERS)} (FORMAT:key=value,...), "
                    f"a .npz / .pt file or A.npy,B.npy")


def load(spec: str, pair: str) -> Dataset:
    """Load and validate a dataset from a spec; raises DataError with a one-line message."""
    if not isinstance(spec, str):   # e.g. the "data" entry of a damaged checkpoint
        raise DataError(f"data spec {spec!r}: not a string")
    name, opts = parse_spec(spec)
    ds = LOADERS[name](parse_options(name, opts, spec), pair, spec)
    ds.spec = spec
    return ds


__all__ = ["DataError", "Dataset", "Split", "Rows", "LOADERS", "OPTIONS", "PRESETS", "load", "parse_options",
           "parse_spec", "synthetic_dataset", "SyntheticSpace", "SyntheticConfig"]
