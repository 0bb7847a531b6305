"""Pluggable loaders for pre-extracted embeddings, keyed by format name.

A data spec is "FORMAT:key=value,key=value" (or a JSON file {"format": ..., "key": value}):

    synthetic[:seed=3,n_train=5000]                the built-in default (synthetic.py)
    synthetic:preset=aligned                       few pairs, strong space (or preset=multimodal)
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
from .synthetic import PRESETS, SyntheticConfig, SyntheticSpace, make_config, synthetic_dataset


def _synthetic_kwargs(opts: dict, spec: str) -> dict:
    """The synthetic options as SyntheticConfig's types; a value that is not a number is a DataError."""
    typed = {}
    for key, value in opts.items():
        kind = type(getattr(SyntheticConfig, key))
        if kind is str:
            typed[key] = value
            continue
        try:
            typed[key] = kind(value)
        except ValueError:
            raise DataError(f"{spec}: option {key}={value!r} needs {'an integer' if kind is int else 'a number'}") from None
    return typed


def _load_synthetic(opts: dict, pair: str, spec: str) -> Dataset:
    return synthetic_dataset(pair, **_synthetic_kwargs(opts, spec))   # keys and ranges: check_options


LOADERS = {"synthetic": _load_synthetic, "arrays": load_arrays, "clap": load_clap, "cavp": load_cavp,
           "dirs": load_dirs}

# Every option each format understands (synthetic: SyntheticConfig's fields). An unknown key is
# refused rather than ignored: a misspelt "vall=0.2" must not silently change the split.
_SPLIT_OPTS = {"val", "test", "drop_bad", "drop_unpaired"}
_IDS_OPTS = {"ids", "id_col", "split_col"}
OPTIONS = {
    "synthetic": set(SyntheticConfig.__dataclass_fields__),
    "arrays": {"file", "a", "b", "a_key", "b_key", "a_ids", "b_ids", "per_a"} | _IDS_OPTS | _SPLIT_OPTS,
    "clap": {"audio", "text", "audio_key", "text_key", "audio_ids", "text_ids", "per_audio"} | _IDS_OPTS | _SPLIT_OPTS,
    "cavp": {"video", "audio", "lists", "key", "pool", "fps", "val", "drop_bad", "drop_unpaired"},
    "dirs": {"a", "b", "key", "pool", "fps"} | _SPLIT_OPTS,
}


def check_options(name: str, opts: dict, spec: str) -> None:
    """Refuse unknown keys and out-of-range values of a data spec, one line naming the key."""
    unknown = sorted(set(opts) - OPTIONS[name])
    if unknown:
        raise DataError(f"{spec}: unknown {name} option {unknown[0]!r} (valid: {', '.join(sorted(OPTIONS[name]))})")

    def number(key, kind=float):
        try:
            return kind(opts[key])
        except ValueError:
            raise DataError(f"{spec}: option {key}={opts[key]!r} needs {'an integer' if kind is int else 'a number'}") from None

    fractions = {k: number(k) for k in ("val", "test") if k in opts}
    for key, value in fractions.items():
        if not 0 <= value < 1:
            raise DataError(f"{spec}: option {key}={opts[key]} must be in [0, 1)")
    if name != "cavp" and fractions.get("val", 0.1) + fractions.get("test", 0.1) >= 1:
        raise DataError(f"{spec}: val + test must be below 1 (the rest is the training split)")
    for key in ("drop_bad", "drop_unpaired"):
        if key in opts and opts[key].lower() not in ("0", "1", "true", "false", "yes", "no"):
            raise DataError(f"{spec}: option {key}={opts[key]!r} must be 0 or 1")
    for key in ("per_a", "per_audio", "fps"):
        if key in opts and not (key != "fps" and opts[key] == "auto") and number(key, int) < 1:
            raise DataError(f"{spec}: option {key}={opts[key]} must be an integer >= 1")
    if name == "synthetic":
        typed = _synthetic_kwargs(opts, spec)
        for key, value in typed.items():
            low = 0 if key == "seed" or isinstance(value, float) else 1   # counts and sizes >= 1; energies >= 0
            if not isinstance(value, str) and value < low:
                raise DataError(f"{spec}: option {key}={opts[key]} must be >= {low}")
        try:
            cfg = make_config(**typed)
        except ValueError as e:
            raise DataError(f"{spec}: {e}") from None
        if cfg.dim < cfg.rank + 2 or cfg.nuisance_rank > cfg.dim:   # coordinates 0, 1: cone and gap
            raise DataError(f"{spec}: the synthetic layout needs dim >= rank + 2 and nuisance_rank <= dim "
                            f"(got dim={cfg.dim}, rank={cfg.rank}, nuisance_rank={cfg.nuisance_rank})")


def parse_spec(spec: str) -> tuple[str, dict]:
    """(format name, options) from a spec string, a JSON spec file, or a path shortcut."""
    if spec.endswith(".json") and os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:   # ValueError: bad JSON, bytes that are not UTF-8
            raise DataError(f"{spec}: not a JSON data spec {{\"format\": ..., ...}} ({type(e).__name__})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("format"), str) or obj["format"] not in LOADERS:
            found = f"format {obj['format']!r}" if isinstance(obj, dict) and "format" in obj else (
                "no \"format\" key" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}")
            raise DataError(f"{spec}: a JSON data spec is an object {{\"format\": one of {', '.join(LOADERS)}, "
                            f"\"key\": value, ...}}; found {found}")
        nested = [k for k, v in obj.items() if isinstance(v, (dict, list))]
        if nested:
            raise DataError(f"{spec}: key {nested[0]!r} holds a {type(obj[nested[0]]).__name__}; values are strings or numbers")
        name = obj.pop("format")
        return name, {str(k): str(v) for k, v in obj.items()}
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
    if not isinstance(spec, str):   # e.g. the "data" entry of a damaged checkpoint
        raise DataError(f"data spec {spec!r}: not a string")
    name, opts = parse_spec(spec)
    check_options(name, opts, spec)
    ds = LOADERS[name](opts, pair, spec)
    ds.spec = spec
    return ds


__all__ = ["DataError", "Dataset", "Split", "Rows", "LOADERS", "OPTIONS", "check_options", "load", "parse_spec", "synthetic_dataset",
           "SyntheticSpace", "SyntheticConfig"]
