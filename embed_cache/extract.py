"""Embed audio files, and their captions, into caches that train.py reads.

    python -m embed_cache.extract --audio-dir clips/ --out audio.npz                  # weight-free logmel
    python -m embed_cache.extract --audio-dir clotho/evaluation --captions clotho_captions_evaluation.csv \\
        --out clotho.npz --encoder hf-clap --model laion/clap-htsat-unfused           # audio and captions
    python -m embed_cache.extract --audio-dir clips/ --captions captions.csv --out audio.npz \\
        --encoder laion-clap --checkpoint 630k-audioset-best.pt

Audio: .wav / .flac / .ogg read with soundfile, mixed down to mono, resampled to the encoder's
rate, and cut to its first window (10 s for CLAP) when longer: the same clip every run, where
CLAP's own "rand_trunc" / "fusion" would take random crops; shorter clips are padded by the
encoder's own rule (CLAP: "repeatpad"). A file's id is its path below --audio-dir without the
extension. Captions: a CSV or JSON file with an id column naming the audio file (with or
without extension, or its path below --audio-dir) and one caption per row (AudioCaps:
audiocap_id,youtube_id,start_time,caption) or several caption columns (Clotho:
file_name,caption_1..caption_5); both sides are embedded by the same model. With --captions,
only audio files that have captions are embedded, and a caption whose id has no audio file is
an error (or left out with --skip-missing).

Caches (.npz): `emb` (N, D) float32 unit rows, `ids` (N,) audio ids, `encoder` (the model, so
a resumed run refuses another); caption caches add `captions` (N,) and `caption_no` (N,) (the
caption's place among its clip's captions). The last line printed is the --data spec that
trains on them (clap:audio=...,text=...). Resumable: rows already in a cache are skipped. Every
write is atomic (temp file, fsync, rename) every --save-every batches and at the end, so a crash
never leaves a broken file. --shard I/N (or torchrun) embeds a stable share of the ids; --merge
joins the parts of one cache.

Encoders (embed_cache/encoders.py): logmel (no weights, audio only), hf-clap (transformers'
ClapModel, from a hub id or a local folder) and laion-clap (pip install laion_clap). Model
downloads follow the libraries' usual rules: HF_HUB_OFFLINE=1 reads only their cache.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import string
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm import tqdm

from .arrays import id_hash, read_named
from .base import atomic_write
from .base import DataError
from .encoders import ENCODER_NAMES, LogMelEncoder, fit_length, make_encoder, mel_filterbank  # noqa: F401 (API)

AUDIO_EXTS = (".wav", ".flac", ".ogg")
ID_COLUMNS = ("file_name", "youtube_id", "audio_id", "id", "filename", "file")   # tried in this order
CAPTION_COLUMN = re.compile(r"^(caption|captions)(_\d+)?$", re.I)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of a mono signal by zero-padding / truncating its spectrum."""
    if sr_in == sr_out:
        return x
    n_out = max(1, round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x)
    keep = min(len(spec), n_out // 2 + 1)
    out = np.zeros(n_out // 2 + 1, dtype=complex)
    out[:keep] = spec[:keep]
    return (np.fft.irfft(out, n_out) * (n_out / len(x))).astype(np.float32)


def read_audio(path: str, sample_rate: int, max_samples: int) -> np.ndarray:
    """A file as mono float32 at sample_rate, cut to its first max_samples (never padded)."""
    import soundfile as sf
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)          # (T, channels)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError on bad files
        raise DataError(f"{path}: cannot read audio ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not np.isfinite(x).all():
        raise DataError(f"{path}: audio has NaN or Inf samples")
    if len(x) == 0:
        raise DataError(f"{path}: no audio samples")
    return resample(x.mean(1), sr, sample_rate)[:max_samples]


def find_audio(folder: str) -> list[tuple[str, str]]:
    """[(id, path)] for every audio file below folder, sorted; the id is the relative path sans extension."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    found = []
    for root, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(AUDIO_EXTS):
                path = os.path.join(root, f)
                found.append((os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/"), path))
    if not found:
        raise DataError(f"{folder}: no {'/'.join(AUDIO_EXTS)} files")
    return sorted(found)


# ----------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------

Caption = tuple[str, int, str]    # (audio id, caption_no: 0.. among that id's captions, text)


def _records(path: str) -> tuple[list[dict], list[str], str]:
    """(rows as dicts, column names in order, how a row is named in messages) of a CSV or JSON file.

    JSON: a list of objects; {"data": [objects]} (WavCaps); {column: [values]}; or {id: caption
    or [captions]} (columns id, caption).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: a BOM must not rename the first column
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                return list(reader), list(reader.fieldnames or []), "line {}".format
            if not path.lower().endswith(".json"):
                raise DataError(f"{path}: captions must be a .csv or .json file")
            obj = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read captions ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        columns = list(dict.fromkeys(k for r in obj for k in r))
        return obj, columns, "record {}".format
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()) and \
            len({len(v) for v in obj.values()}) == 1 and any(CAPTION_COLUMN.match(k) for k in obj):
        n = len(next(iter(obj.values())))
        return [{k: v[i] for k, v in obj.items()} for i in range(n)], list(obj), "record {}".format
    if isinstance(obj, dict) and all(isinstance(v, (str, list)) for v in obj.values()):
        return [{"id": k, "caption": v} for k, v in obj.items()], ["id", "caption"], "key {}".format
    raise DataError(f"{path}: not a caption layout (a list of objects, {{\"data\": [...]}}, {{column: [...]}} "
                    f"or {{id: caption}})")


def read_captions(path: str, id_col: Optional[str] = None, caption_cols: Optional[list[str]] = None) -> list[Caption]:
    """[(id, caption_no, text)] from a CSV / JSON caption file, in file order.

    id_col: the column naming each row's audio file (default: the first of ID_COLUMNS present),
    or a template of columns such as "{youtube_id}_{start_time}"; an audio extension is dropped
    from the id. caption_cols: the caption columns (default: every column named caption,
    caption_N or captions, in their order); a cell may hold a list. Empty captions are skipped.
    """
    rows, columns, where = _records(path)
    first = 2 if path.lower().endswith(".csv") else 0        # CSV: line 1 is the header
    found = f"columns: {', '.join(map(str, columns)) or 'none'}"
    if id_col is None:
        id_col = next((c for c in ID_COLUMNS if c in columns), None)
        if id_col is None:
            raise DataError(f"{path}: no id column ({', '.join(ID_COLUMNS)}; {found}); name the column of audio "
                            f"file names with --id-col")
    fields = [f for _, f, _, _ in string.Formatter().parse(id_col) if f] if "{" in id_col else [id_col]
    for f in fields:
        if f not in columns:
            raise DataError(f"{path}: no id column {f!r} ({found}); name the column of audio file names with --id-col")
    if caption_cols is None:
        numbered = lambda c: int((CAPTION_COLUMN.match(c).group(2) or "_0")[1:])   # caption_10 after caption_9
        caption_cols = sorted((c for c in map(str, columns) if CAPTION_COLUMN.match(c)), key=numbered)
        if not caption_cols:
            raise DataError(f"{path}: no caption column (caption, caption_1, ...; {found}); name it with --caption-col")
    for c in caption_cols:
        if c not in columns:
            raise DataError(f"{path}: no caption column {c!r} ({found})")
    out, count = [], defaultdict(int)
    for k, row in enumerate(rows):
        values = {f: "" if row.get(f) is None else str(row[f]).strip() for f in fields}
        cid = id_col.format(**values) if "{" in id_col else values[id_col]
        if not all(values.values()):
            raise DataError(f"{path}: {where(k + first)}: empty id ({', '.join(fields)})")
        if cid.lower().endswith(AUDIO_EXTS):
            cid = os.path.splitext(cid)[0]
        cid = cid.replace("\\", "/")
        for col in caption_cols:
            cell = row.get(col)
            for text in cell if isinstance(cell, list) else [cell]:
                text = "" if text is None else " ".join(str(text).split())
                if text:
                    out.append((cid, count[cid], text))
                    count[cid] += 1
    if not out:
        raise DataError(f"{path}: no captions in columns {', '.join(caption_cols)}")
    return out


@dataclass
class Plan:
    """What an extraction embeds: audio files, and captions with their ids matched to those files."""
    files: list[tuple[str, str]]                 # [(audio id, path)]
    captions: Optional[list[Caption]] = None     # ids are audio ids
    skipped: int = 0                             # captions left out by --skip-missing
    uncaptioned: int = 0                         # audio files without captions (not embedded)


def make_plan(audio_dir: str, captions: Optional[str] = None, id_col: Optional[str] = None,
              caption_cols: Optional[list[str]] = None, skip_missing: bool = False) -> Plan:
    """The files of audio_dir, or with a caption file: its captions and the files they name.

    A caption id matches an audio id (the path below audio_dir without extension) exactly, or the
    file name of exactly one audio file in a subfolder. Raises DataError for caption ids without
    an audio file (unless skip_missing) and for a name that matches two files.
    """
    files = find_audio(audio_dir)
    if captions is None:
        return Plan(files)
    caps = read_captions(captions, id_col, caption_cols)
    ids = {i for i, _ in files}
    by_name = defaultdict(list)
    for i in ids:
        by_name[i.rsplit("/", 1)[-1]].append(i)
    resolved, missing = [], []
    for cid, n, text in caps:
        if cid not in ids and "/" not in cid and len(by_name.get(cid, ())) > 1:
            a, b = sorted(by_name[cid])[:2]
            raise DataError(f"{captions}: id {cid!r} names two files below {audio_dir} ({a!r}, {b!r}); point "
                            f"--audio-dir at one folder")
        audio_id = cid if cid in ids else (by_name[cid][0] if len(by_name.get(cid, ())) == 1 else None)
        if audio_id is None:
            missing.append(cid)
        else:
            resolved.append((audio_id, n, text))
    absent = sorted(set(missing))
    if absent and not skip_missing:
        shown = ", ".join(map(repr, absent[:3])) + (" ..." if len(absent) > 3 else "")
        raise DataError(f"{captions}: {len(absent)} caption ids have no audio file in {audio_dir} (e.g. {shown}); "
                        f"add the files, fix --id-col, or pass --skip-missing to leave their captions out")
    if not resolved:
        raise DataError(f"{captions}: no caption id has an audio file in {audio_dir}; check --id-col")
    named = {i for i, _, _ in resolved}
    return Plan([f for f in files if f[0] in named], resolved, len(missing), len(ids - named))


# ----------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------

TEXT_COLUMNS = ("captions", "caption_no")


def load_cache(path: str, encoder: str, text: bool = False) -> dict[str, list]:
    """The columns of an existing cache as lists (empty when there is none), checked to come
    from the same encoder and to be of the asked kind (audio, or captions when text)."""
    names = ("emb", "ids") + (TEXT_COLUMNS if text else ())
    if not os.path.exists(path):
        return {k: [] for k in names}
    kinds = read_named(path, ["encoder"])
    if ("captions" in kinds) != text:
        raise DataError(f"{path}: a cache of {'captions' if 'captions' in kinds else 'audio'}, not of "
                        f"{'captions' if text else 'audio'}; use another {'--text-out' if text else '--out'}")
    found = read_named(path, list(names) + ["encoder"])
    if str(found["encoder"]) != encoder:
        raise DataError(f"{path}: written by encoder {str(found['encoder'])!r}, not {encoder!r}; use another "
                        f"{'--text-out' if text else '--out'}")
    if any(len(found[k]) != len(found["emb"]) for k in names):
        raise DataError(f"{path}: columns of different lengths ({', '.join(f'{k} {len(found[k])}' for k in names)})")
    cache = {k: list(found[k]) for k in names}
    cache["ids"] = [str(i) for i in cache["ids"]]
    for k in TEXT_COLUMNS if text else ():
        cache[k] = [str(x) for x in cache[k]] if k == "captions" else [int(x) for x in cache[k]]
    return cache


def read_cache(path: str, encoder: str) -> tuple[list[str], list[np.ndarray]]:
    """(ids, rows) already in an existing audio cache, checked to come from the same encoder."""
    cache = load_cache(path, encoder)
    return cache["ids"], cache["emb"]


def write_cache(path: str, cache: dict[str, list] | list[str], rows: Optional[list[np.ndarray]] = None,
                encoder: str = "", shard: tuple[int, int] | None = None) -> None:
    """Rewrite a cache atomically and durably (temp file, fsync, rename, fsync of the folder).

    cache: the columns (emb, ids[, captions, caption_no]); or, as before, ids with rows= as emb.
    A shard's part also records which shard it is ("i/n"), so that merge() can check the parts.
    """
    if not isinstance(cache, dict):
        cache = {"ids": cache, "emb": rows}
    emb = np.stack(cache["emb"]).astype(np.float32) if cache["emb"] else np.zeros((0, 0), np.float32)
    arrays = {"emb": emb, "ids": np.array(cache["ids"], dtype=str), "encoder": np.array(encoder)}
    if "captions" in cache:
        arrays["captions"] = np.array(cache["captions"], dtype=str)
        arrays["caption_no"] = np.array(cache["caption_no"], dtype=np.int64)
    if shard is not None:
        arrays["shard"] = np.array(f"{shard[0]}/{shard[1]}")
    atomic_write(path, lambda f: np.savez(f, **arrays))


def in_shard(file_id: str, shard: tuple[int, int]) -> bool:
    """Whether an id belongs to shard (i, n): a stable hash of it, so adding files moves none.
    A caption goes with its audio id."""
    i, n = shard
    return id_hash(file_id) % n == i


def part_path(out: str, shard: tuple[int, int]) -> str:
    """Where shard (i, n) of cache `out` is written: CACHE.npz -> CACHE.part-i-of-n.npz."""
    return f"{out[:-len('.npz')]}.part-{shard[0]}-of-{shard[1]}.npz"


def _embed_into(out: str, cache: dict[str, list], todo: list, embed, batch_size: int, save_every: int,
                encoder: str, shard, desc: str) -> None:
    """Embed `todo` in batches into `cache`, rewriting `out` every save_every batches and at the end.

    embed(batch) -> (emb (B, D), {column: B values}). Whatever was embedded is written even when
    a later batch fails or on Ctrl-C, and the columns are cut to a common length first.
    """
    saved = len(cache["ids"])               # rows already in the file on disk
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    try:
        for n, batch in enumerate(tqdm(batches, unit="batch", desc=desc)):
            emb, columns = embed(batch)
            emb = np.asarray(emb, dtype=np.float32)
            bad = np.flatnonzero(~np.isfinite(emb).all(1))
            if len(bad):
                raise DataError(f"{out}: the encoder returned NaN or Inf for {columns['ids'][bad[0]]!r}; nothing of "
                                f"this batch was written")
            for k, values in columns.items():
                cache[k] += list(values)
            cache["emb"] += list(emb)
            if (n + 1) % save_every == 0:
                write_cache(out, cache, encoder=encoder, shard=shard)
                saved = len(cache["ids"])
    finally:
        n = min(len(v) for v in cache.values())
        for k in cache:
            del cache[k][n:]
        if n > saved or (shard is not None and not os.path.exists(out)):   # an empty shard still says so
            write_cache(out, cache, encoder=encoder, shard=shard)


def extract(audio_dir: str, out: str, encoder, batch_size: int = 16, save_every: int = 50,
            shard: tuple[int, int] | None = None, files: Optional[list[tuple[str, str]]] = None) -> int:
    """Embed every audio file not yet in `out` (of shard (i, n) only, if given); returns how many were added.

    files: [(id, path)] to embed instead of every file below audio_dir (make_plan's selection).
    """
    files = find_audio(audio_dir) if files is None else files
    if shard is not None:
        files = [(i, p) for i, p in files if in_shard(i, shard)]
    cache = load_cache(out, encoder.name)
    done = set(cache["ids"])
    todo = [(i, p) for i, p in files if i not in done]
    window = int(round(encoder.sample_rate * encoder.clip_seconds))

    def embed(batch):
        clips = [read_audio(p, encoder.sample_rate, window) for _, p in batch]
        return encoder.embed_audio(clips), {"ids": [i for i, _ in batch]}

    _embed_into(out, cache, todo, embed, batch_size, save_every, encoder.name, shard, f"{encoder.name} audio")
    return len(todo)


def captions_todo(captions: list[Caption], cache: dict[str, list], out: str, shard: tuple[int, int] | None = None,
                  source: str = "captions") -> list[Caption]:
    """The captions (of shard (i, n)'s audio ids) not yet in `cache`, sorted by (id, caption_no).

    A caption is known by (audio id, caption_no); one already in the cache with other text is a
    DataError naming `source` (the caption file changed: its old rows would pair wrongly).
    """
    if shard is not None:
        captions = [c for c in captions if in_shard(c[0], shard)]
    have = {(i, n): t for i, n, t in zip(cache["ids"], cache["caption_no"], cache["captions"])}
    todo = []
    for cid, n, text in sorted(captions):
        old = have.get((cid, n))
        if old is None:
            todo.append((cid, n, text))
        elif old != text:
            raise DataError(f"{source}: caption {n + 1} of {cid!r} is {text[:60]!r}, but {out} holds "
                            f"{old[:60]!r} for it; use another --text-out")
    return todo


def extract_captions(captions: list[Caption], out: str, encoder, batch_size: int = 16, save_every: int = 50,
                     shard: tuple[int, int] | None = None, source: str = "captions") -> int:
    """Embed every caption not yet in `out` (those of shard (i, n)'s audio ids only, if given).

    A caption already in `out` with other text is a DataError (captions_todo). Returns how many were added.
    """
    if not getattr(encoder, "has_text", False):
        raise DataError(f"--encoder {encoder.name} embeds audio only; captions need --encoder hf-clap or laion-clap")
    cache = load_cache(out, encoder.name, text=True)
    todo = captions_todo(captions, cache, out, shard, source)

    def embed(batch):
        return encoder.embed_text([t for _, _, t in batch]), {
            "ids": [i for i, _, _ in batch], "caption_no": [n for _, n, _ in batch], "captions": [t for _, _, t in batch]}

    _embed_into(out, cache, todo, embed, batch_size, save_every, encoder.name, shard, f"{encoder.name} captions")
    return len(todo)


def merge(parts: list[str], out: str, audio_dir: str | None = None, expect: Optional[set] = None) -> int:
    """Join shard caches into `out`, rows sorted by id (as one process writes them); returns the row count.

    Refuses parts from different encoders, of different kinds (audio, captions) or shard counts,
    a shard given twice or missing, a row in two parts, and rows missing from every part: the
    `expect`ed keys (audio ids, or (id, caption_no) of captions), or else every audio file of audio_dir.
    """
    encoders, shards, kinds, merged, owner = set(), {}, set(), defaultdict(list), {}
    for path in parts:
        text = "captions" in read_named(path, ["encoder", "shard"])
        kinds.add("captions" if text else "audio")
        cols = ["emb", "ids"] + (list(TEXT_COLUMNS) if text else [])
        found = read_named(path, cols + ["encoder", "shard"])
        encoders.add(str(found["encoder"]))
        i, n = (int(x) for x in str(found["shard"]).split("/"))
        if (i, n) in shards:
            raise DataError(f"{path}: shard {i}/{n} is also in {shards[(i, n)]}")
        shards[(i, n)] = path
        for r in range(len(found["ids"])):
            key = (str(found["ids"][r]), int(found["caption_no"][r])) if text else str(found["ids"][r])
            if key in owner:
                raise DataError(f"{path}: {'caption' if text else 'id'} {key!r} is also in {owner[key]}")
            owner[key] = path
            merged["key"].append(key)
            for c in cols:
                merged[c].append(found[c][r])
    if len(kinds) > 1:
        raise DataError(f"{', '.join(parts)}: parts of audio and of captions; merge each cache on its own")
    if len(encoders) > 1:
        raise DataError(f"{', '.join(parts)}: written by different encoders ({', '.join(sorted(encoders))})")
    counts = {n for _, n in shards}
    if len(counts) > 1:
        raise DataError(f"{', '.join(parts)}: parts of different shard counts ({', '.join(map(str, sorted(counts)))})")
    n = counts.pop()
    missing = sorted(set(range(n)) - {i for i, _ in shards})
    if missing:
        raise DataError(f"shard {missing[0]}/{n} is missing: give all {n} parts ({part_path(out, (missing[0], n))})")
    if expect is None and audio_dir is not None and kinds == {"audio"}:
        expect = {i for i, _ in find_audio(audio_dir)}
    if expect is not None:
        absent = sorted(set(expect) - set(owner))
        if absent:
            what = "files" if kinds == {"audio"} else "captions"
            raise DataError(f"{audio_dir or out}: {len(absent)} {what} are in no part, e.g. "
                            f"{', '.join(map(str, absent[:3]))}")
    order = sorted(range(len(merged["key"])), key=merged["key"].__getitem__)
    cache = {c: [merged[c][k] for k in order] for c in merged if c != "key"}
    for c in ("emb", "ids") + (TEXT_COLUMNS if kinds == {"captions"} else ()):
        cache.setdefault(c, [])
    write_cache(out, cache, encoder=encoders.pop())
    return len(order)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """--shard I/N, or torchrun's RANK / WORLD_SIZE when launched by it, or None (one process)."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ["RANK"]), world) if world > 1 else None
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise DataError(f"--shard {text}: use I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(i), int(n)


def data_spec(audio: str, text: str, encoder: str) -> tuple[str, str]:
    """(the --data spec that trains on an audio and a caption cache, a note on unpaired ids)."""
    a_ids = set(load_cache(audio, encoder)["ids"])
    t_ids = set(load_cache(text, encoder, text=True)["ids"])
    spec = f"clap:audio={audio},text={text},text_key=emb"
    if a_ids - t_ids or t_ids - a_ids:
        return spec + ",drop_unpaired=1", (f"{len(a_ids - t_ids)} audio ids without captions and {len(t_ids - a_ids)} "
                                           f"caption ids without audio in these caches: drop_unpaired=1 leaves them out")
    return spec, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio-dir", help="folder of audio files (with --merge: check that every file, or with "
                                       "--captions every captioned file or caption, is in a part)")
    p.add_argument("--out", required=True, help="audio cache .npz (resumed when it exists); a shard writes "
                                                "OUT.part-I-of-N.npz")
    p.add_argument("--captions", help="caption file (.csv or .json) with an id column and caption column(s): "
                                      "embeds its captions into --text-out, and only the audio files they name")
    p.add_argument("--text-out", help="caption cache .npz (default: OUT with .captions.npz)")
    p.add_argument("--id-col", help="column naming each caption's audio file (default: the first of "
                                    f"{', '.join(ID_COLUMNS)}), or a template like '{{youtube_id}}_{{start_time}}'")
    p.add_argument("--caption-col", help="caption columns, comma-separated (default: caption, caption_1, ...)")
    p.add_argument("--skip-missing", action="store_true", help="leave out captions whose audio file is not in "
                                                               "--audio-dir (default: an error)")
    p.add_argument("--shard", help="I/N: embed only shard I of N (a stable split by audio id); default under "
                                   "torchrun: RANK/WORLD_SIZE")
    p.add_argument("--merge", nargs="+", metavar="PART", help="join shard parts of one cache into --out instead of "
                                                               "embedding (captions' parts: a second --merge)")
    p.add_argument("--encoder", choices=ENCODER_NAMES, default="logmel",
                   help="logmel (no weights, audio only), hf-clap (transformers), laion-clap (clap: the same)")
    p.add_argument("--model", help="hf-clap: hub id or local folder (default laion/clap-htsat-unfused); "
                                   "laion-clap: audio tower, HTSAT-tiny (default) or HTSAT-base")
    p.add_argument("--checkpoint", help="laion-clap: local .pt (default: laion_clap downloads its own)")
    p.add_argument("--fusion", action="store_true", help="laion-clap: a fusion checkpoint")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--save-every", type=int, default=50, help="batches between cache writes")
    args = p.parse_args(argv)
    for name in ("out", "text_out"):
        if getattr(args, name) is not None and not getattr(args, name).endswith(".npz"):
            p.error(f"--{name.replace('_', '-')} must be a .npz file")
    for name in ("batch_size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    text_out = args.text_out or (args.out[:-len(".npz")] + ".captions.npz")
    cols = [c.strip() for c in args.caption_col.split(",") if c.strip()] if args.caption_col else None
    try:
        if args.text_out and not args.captions:
            raise DataError("--text-out needs --captions FILE (the captions to embed)")
        if args.captions and os.path.abspath(text_out) == os.path.abspath(args.out):
            raise DataError(f"--text-out {text_out}: the same file as --out")
        if args.captions and not args.audio_dir:
            raise DataError("--captions needs --audio-dir (the audio files the captions describe)")
        if args.merge:
            plan = make_plan(args.audio_dir, args.captions, args.id_col, cols, args.skip_missing) \
                if args.captions else None
            expect = None
            if plan is not None:
                text = "captions" in read_named(args.merge[0], ["encoder"])
                expect = {(i, n) for i, n, _ in plan.captions} if text else {i for i, _ in plan.files}
            rows = merge(args.merge, args.out, args.audio_dir, expect)
            print(f"{args.out}: {rows} embeddings from {len(args.merge)} parts")
            return 0
        if not args.audio_dir:
            p.error("--audio-dir is required (unless --merge)")
        if args.captions and args.encoder == "logmel":
            raise DataError("--encoder logmel embeds audio only; captions need --encoder hf-clap or laion-clap")
        shard = parse_shard(args.shard)
        plan = make_plan(args.audio_dir, args.captions, args.id_col, cols, args.skip_missing)   # before any weights load
        out = args.out if shard is None else part_path(args.out, shard)
        text_part = None if args.captions is None else text_out if shard is None else part_path(text_out, shard)
        encoder = make_encoder(args.encoder, args.model, args.checkpoint, args.fusion, args.device)
        load_cache(out, encoder.name)                      # refuse a wrong cache before embedding anything
        if text_part:
            captions_todo(plan.captions, load_cache(text_part, encoder.name, text=True), text_part, shard, args.captions)
        added = extract(args.audio_dir, out, encoder, args.batch_size, args.save_every, shard, plan.files)
        total = len(load_cache(out, encoder.name)["ids"])
        print(f"{out}: {total} audio embeddings ({added} new, {total - added} already there), encoder {encoder.name}")
        if plan.uncaptioned:
            print(f"{args.audio_dir}: {plan.uncaptioned} audio files have no caption in {args.captions}: not embedded")
        if text_part is None:
            return 0
        t_added = extract_captions(plan.captions, text_part, encoder, args.batch_size, args.save_every, shard,
                                   args.captions)
        cache = load_cache(text_part, encoder.name, text=True)
        print(f"{text_part}: {len(cache['ids'])} caption embeddings ({t_added} new, {len(cache['ids']) - t_added} "
              f"already there) of {len(set(cache['ids']))} audio ids")
        if plan.skipped:
            print(f"{args.captions}: {plan.skipped} captions left out: their audio file is not in {args.audio_dir} "
                  f"(--skip-missing)")
        if shard is not None:
            n = shard[1]
            merge_args = f"--audio-dir {args.audio_dir} --captions {args.captions}" + \
                         (f" --id-col '{args.id_col}'" if args.id_col else "") + (" --skip-missing" if args.skip_missing else "")
            for cache_out in (args.out, text_out):
                print(f"when all {n} shards are done: python -m embed_cache.extract --merge "
                      f"{cache_out[:-4]}.part-*-of-{n}.npz --out {cache_out} {merge_args}")
            return 0
        spec, note = data_spec(out, text_part, encoder.name)
        if note:
            print(note)
        print(f"train on them: python train.py --pair audio-text --data {spec}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
