"""Embed audio files, and their captions, into caches that train.py reads.

    python -m embed_cache.extract --audio-dir clips/ --out audio.npz                  # weight-free logmel
    python -m embed_cache.extract --audio-dir clotho/evaluation --captions clotho_captions_evaluation.csv \\
        --out clotho.npz --encoder hf-clap --model laion/clap-htsat-unfused           # audio and captions

Audio is mixed to mono, resampled and cut to the encoder's first window; its id is its path below --audio-dir
without the extension. Caches (.npz): `emb` (N, D) float32 unit rows, `ids`, `encoder` (+ `captions`, `caption_no`).
Runs resume, writes are atomic, --shard I/N (or torchrun) embeds a stable share of the ids and --merge joins the
parts; the last line is the --data spec to train on."""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import math
import os
import re
import string
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .arrays import id_hash, read_named
from .base import DataError, atomic_write, pick_device, read_text, reason

AUDIO_EXTS = (".wav", ".flac", ".ogg")
ID_COLUMNS = ("file_name", "youtube_id", "audio_id", "id", "filename", "file")   # tried in this order
CAPTION_COLUMN = re.compile(r"^(caption|captions)(_\d+)?$", re.I)
TEXT_COLUMNS = ("captions", "caption_no")
Caption = tuple[str, int, str]    # (audio id, caption_no: 0.. among that id's captions, text)
Shard = Optional[tuple[int, int]]  # (i, n): shard i of n; None: one process


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
    """A file as mono float32 at sample_rate, cut to its first max_samples (never padded). Only the frames
    that become them are read and resampled, so a long recording costs what its first window does."""
    import soundfile as sf
    try:
        sr = sf.info(path).samplerate
        x, _ = sf.read(path, frames=math.ceil(max_samples * sr / sample_rate), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError on bad files
        raise DataError(f"{path}: cannot read audio ({reason(e)})") from None
    if not np.isfinite(x).all():
        raise DataError(f"{path}: audio has NaN or Inf samples")
    if len(x) == 0:
        raise DataError(f"{path}: no audio samples")
    return resample(x.mean(1), sr, sample_rate)[:max_samples]


def find_audio(folder: str) -> list[tuple[str, str]]:
    """[(id, path)] of every audio file below folder, sorted; the id is the relative path sans extension."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    found = sorted((os.path.splitext(os.path.relpath(os.path.join(root, f), folder))[0].replace(os.sep, "/"),
                    os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(AUDIO_EXTS))
    if not found:
        raise DataError(f"{folder}: no {'/'.join(AUDIO_EXTS)} files")
    for (i, p), (j, q) in zip(found, found[1:]):   # sorted: files of one id are neighbours
        if i == j:
            raise DataError(f"{folder}: id {i!r} (a path without its extension) has two files ({p}, {q}); keep one")
    return found


# -- encoders: `name` (kept in the cache, so a resumed run refuses another model), `sample_rate`,
# `clip_seconds` (the window: longer files are cut to their first, where both CLAPs would take a
# random crop per call), `has_text`; embed_audio(mono clips) / embed_text(captions) -> (B, D) unit rows
def import_optional(module: str, who: str):
    """Import an optional package, or one DataError: it is missing, or installed but its import fails (why)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # an installed package that fails while importing: any error type
        if isinstance(e, ModuleNotFoundError) and e.name == module:   # the package itself, not one of its imports
            raise DataError(f"{who} needs the {module} package: pip install {module}"
                            + (" (--encoder logmel needs nothing)" if who.startswith("--encoder") else "")) from None
        raise DataError(f"{who}: {module} is installed but cannot be imported ({reason(e)}); fix or reinstall what "
                        f"it names (python -c 'import {module}' shows the traceback)") from None


def model_name(model: str) -> str:
    """A model as caches and checkpoints record it: a folder by its real path (the same from any working folder)."""
    return os.path.realpath(model) if os.path.isdir(model) else model


def unit_rows(x) -> np.ndarray:
    """(B, D) float32 numpy unit rows from a tensor, an array, or a transformers 5.x output (pooler_output)."""
    x = getattr(x, "pooler_output", x)
    return torch.nn.functional.normalize(torch.as_tensor(x).detach().float().cpu(), dim=1).numpy()


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Crop to the first n samples, or repeat the clip until it fills n."""
    if len(x) >= n:
        return x[:n]
    return np.zeros(n, dtype=np.float32) if len(x) == 0 else np.tile(x, math.ceil(n / len(x)))[:n]


class LogMelEncoder:
    """Mean and std over time of 64 log-mel bands through a fixed random projection to `dim`; 16 kHz, 5 s windows."""
    name, sample_rate, clip_seconds, has_text = "logmel", 16000, 5.0, False

    def __init__(self, dim: int = 512, n_fft: int = 512, hop: int = 256, n_mels: int = 64):
        self.n_fft, self.hop, sr = n_fft, hop, self.sample_rate
        mel, hz = (lambda f: 2595 * np.log10(1 + f / 700)), (lambda m: 700 * (10 ** (m / 2595) - 1))   # HTK mel scale
        edges, freqs = hz(np.linspace(mel(0), mel(sr / 2), n_mels + 2)), np.linspace(0, sr / 2, n_fft // 2 + 1)
        lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]   # triangular filters (n_mels, n_fft // 2 + 1)
        self.fb = torch.from_numpy(np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))).float()
        g = torch.Generator().manual_seed(0)   # the same projection on every machine and run
        self.proj = torch.randn(2 * n_mels, dim, generator=g) / math.sqrt(2 * n_mels)

    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        n = int(self.sample_rate * self.clip_seconds)
        return self.embed(np.stack([fit_length(np.asarray(c, np.float32), n) for c in clips]))

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """(B, T) float32 at 16 kHz, all of one length -> (B, dim) unit rows."""
        spec = torch.stft(torch.from_numpy(audio), self.n_fft, self.hop, window=torch.hann_window(self.n_fft),
                          return_complex=True)
        logmel = torch.log(self.fb @ spec.abs().pow(2) + 1e-6)                        # (B, mels, frames)
        stats = torch.cat([logmel.mean(-1), logmel.std(-1)], dim=1)                   # (B, 2 mels)
        return torch.nn.functional.normalize((stats - stats.mean(1, keepdim=True)) @ self.proj, dim=1).numpy()


class HFClapEncoder:
    """transformers' ClapModel and ClapProcessor (a hub id or a save_pretrained folder), or with pipeline=True
    a MusicLDM pipeline's CLAP (its text_encoder, tokenizer and feature_extractor): the generator's condition
    space. A "fusion" model gets is_longer False (clips are cut to the window), where the processor flags a
    random clip per batch. AudioLDM's text tower alone (ClapTextModelWithProjection) embeds text only."""
    has_text = True

    def __init__(self, model, tokenizer, feature_extractor, name: str):
        """Embed with these modules (a pipeline's own, already loaded); without a feature extractor, text only."""
        self.model, self.tokenizer, self.fe, self.name, self.device = model.eval(), tokenizer, feature_extractor, name, model.device
        if feature_extractor is not None:
            fe = feature_extractor
            self.sample_rate, self.clip_seconds = int(fe.sampling_rate), fe.nb_max_samples / fe.sampling_rate
            self.fusion = fe.truncation == "fusion"
        cfg = getattr(model.config, "text_config", model.config)
        longest = cfg.max_position_embeddings - (cfg.pad_token_id or 0) - 1   # RoBERTa positions start after pad
        self.max_tokens = min(longest, tokenizer.model_max_length)

    @classmethod
    def load(cls, model: str, device: str = "auto", pipeline: bool = False) -> "HFClapEncoder":
        transformers = import_optional("transformers", "--encoder " + ("musicldm" if pipeline else "hf-clap"))
        sub = (lambda name: {"subfolder": name}) if pipeline else (lambda name: {})   # a pipeline's own folders
        device = pick_device(device)   # --device cuda without CUDA: said before any weights load
        try:
            clap = transformers.ClapModel.from_pretrained(model, **sub("text_encoder")).to(device)
            if pipeline:
                parts = (transformers.ClapFeatureExtractor.from_pretrained(model, subfolder="feature_extractor"),
                         transformers.AutoTokenizer.from_pretrained(model, subfolder="tokenizer"))
            else:
                processor = transformers.ClapProcessor.from_pretrained(model)
                parts = processor.feature_extractor, processor.tokenizer
        except (OSError, ValueError) as e:
            path = model.startswith((".", "/", "~")) or model.count("/") > 1   # hub ids are NAME or ORG/NAME
            what = "a MusicLDM pipeline saved with save_pretrained" if pipeline else "a CLAP saved with save_pretrained"
            raise DataError(f"--model {model}: " + (
                f"a folder, but not {what} ({reason(e)})" if os.path.isdir(model) else
                f"no such folder, and not a hub id like {'ucsd-reach/musicldm' if pipeline else 'laion/clap-htsat-unfused'}"
                if path else f"not in the Hugging Face cache and not downloadable (offline, or no such model); hf download "
                f"{model} once with a network ({reason(e)})")) from None
        # a pipeline by model_name, which generate.py compares with the one it is given
        return cls(clap, parts[1], parts[0], f"musicldm:{model_name(model)}" if pipeline else f"hf-clap:{model}")

    @torch.no_grad()
    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        inputs = self.fe([np.asarray(c, np.float32) for c in clips], sampling_rate=self.sample_rate, return_tensors="pt")
        if self.fusion:
            inputs["is_longer"] = torch.zeros_like(inputs["is_longer"])
        return unit_rows(self.model.get_audio_features(**{k: v.to(self.device) for k, v in inputs.items()}))

    @torch.no_grad()
    def embed_text(self, captions: list[str]) -> np.ndarray:
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        text = getattr(self.model, "get_text_features", None)   # None: a text tower alone, whose output has text_embeds
        return unit_rows(text(**tokens) if text else self.model(**tokens).text_embeds)


class LaionClapEncoder:
    """LAION-CLAP's CLAP_Module (48 kHz, 10 s windows). checkpoint: a local .pt, or None for laion_clap's
    default download; amodel: its audio tower (HTSAT-tiny: the 630k ones, HTSAT-base: music)."""
    has_text, sample_rate, clip_seconds = True, 48000, 10.0

    def __init__(self, checkpoint: str | None, amodel: str = "HTSAT-tiny", fusion: bool = False, device: str = "auto"):
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise DataError(f"--checkpoint {checkpoint}: no such file (a LAION-CLAP .pt; leave it out to let "
                            f"laion_clap download its default)")
        self.device = pick_device(device)
        with contextlib.redirect_stdout(sys.stderr):   # laion_clap prints progress to stdout
            laion_clap = import_optional("laion_clap", "--encoder laion-clap")
            try:   # 'roberta-base' not cached offline, a bad amodel, a checkpoint of another tower, a failed download
                self.model = laion_clap.CLAP_Module(enable_fusion=fusion, amodel=amodel, device=self.device)
                self.model.load_ckpt(checkpoint, verbose=False)
            except Exception as e:
                raise DataError(f"--encoder laion-clap: cannot set up --model {amodel}{' --fusion' if fusion else ''} with "
                                f"{checkpoint or 'the default checkpoint'} ({reason(e)}); it needs the text model "
                                f"'roberta-base' (a network once, then the cache) and a checkpoint of that model") from None
        ckpt = os.path.basename(checkpoint) if checkpoint else "default"
        self.name = f"laion-clap:{ckpt}:{amodel}{':fusion' if fusion else ''}"

    @torch.no_grad()
    def embed_audio(self, clips: list[np.ndarray]) -> np.ndarray:   # laion_clap quantises and repeat-pads itself
        return unit_rows(self.model.get_audio_embedding_from_data(x=[np.asarray(c, np.float32) for c in clips], use_tensor=False))

    @torch.no_grad()
    def embed_text(self, captions: list[str]) -> np.ndarray:
        return unit_rows(self.model.get_text_embedding(list(captions), use_tensor=False))


# -- captions ---------------------------------------------------------------------------------
def _records(path: str) -> tuple[list[dict], list[str], str]:
    """(rows as dicts, column names, how a row is named in messages) of a CSV or JSON caption file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if not path.lower().endswith((".csv", ".json")):
        raise DataError(f"{path}: captions must be a .csv or .json file")
    text = read_text(path)
    try:
        if path.lower().endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text, newline=""))
            return list(reader), list(reader.fieldnames or []), lambda k: f"line {k + 2}"   # line 1: the header
        obj = json.loads(text)
    except (ValueError, csv.Error) as e:   # ValueError: bad JSON
        raise DataError(f"{path}: cannot read captions ({reason(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):   # WavCaps: {"data": [objects]}
        obj = obj["data"]
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj, list(dict.fromkeys(k for r in obj for k in r)), "record {}".format
    if isinstance(obj, dict) and all(isinstance(v, (str, list)) for v in obj.values()):
        return [{"id": k, "caption": v} for k, v in obj.items()], ["id", "caption"], "key {}".format
    raise DataError(f"{path}: not a caption layout (a list of objects, {{\"data\": [...]}} or {{id: caption}})")


def read_captions(path: str, id_col: Optional[str] = None, caption_cols: Optional[list[str]] = None) -> list[Caption]:
    """[(id, caption_no, text)] of a caption file, in file order. id_col: the column naming each row's
    audio file (default: the first of ID_COLUMNS) or a template like "{youtube_id}_{start_time}";
    caption_cols: default every column caption, caption_N or captions; a cell may hold a list."""
    rows, columns, where = _records(path)
    found, fix = f"columns: {', '.join(map(str, columns)) or 'none'}", "name the column of audio file names with --id-col"
    id_col = next((c for c in ID_COLUMNS if c in columns), None) if id_col is None else id_col
    if id_col is None:
        raise DataError(f"{path}: no id column ({', '.join(ID_COLUMNS)}; {found}); {fix}")
    fields = [f for _, f, _, _ in string.Formatter().parse(id_col) if f] if "{" in id_col else [id_col]
    for f in fields:
        if f not in columns:
            raise DataError(f"{path}: no id column {f!r} ({found}); {fix}")
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
        if not all(values.values()):
            raise DataError(f"{path}: {where(k)}: empty id ({', '.join(fields)})")
        cid = id_col.format(**values) if "{" in id_col else values[id_col]
        cid = (os.path.splitext(cid)[0] if cid.lower().endswith(AUDIO_EXTS) else cid).replace("\\", "/")
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
    """The files of audio_dir, or with a caption file its captions and the files they name: a caption id
    is an audio id, or the file name of exactly one file in a subfolder (else a DataError)."""
    files = find_audio(audio_dir)
    if captions is None:
        return Plan(files)
    ids, by_name = {i for i, _ in files}, defaultdict(list)
    for i in ids:
        by_name[i.rsplit("/", 1)[-1]].append(i)
    resolved, missing = [], []
    for cid, n, text in read_captions(captions, id_col, caption_cols):
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


# -- caches -----------------------------------------------------------------------------------
def load_cache(path: str, encoder: str, text: bool = False) -> dict[str, list]:
    """The columns of a cache as lists (none there: empty), checked to be of `encoder` and of captions iff text."""
    names = ("emb", "ids") + (TEXT_COLUMNS if text else ())
    if not os.path.exists(path):
        return {k: [] for k in names}
    flag = "--text-out" if text else "--out"
    if ("captions" in read_named(path, ["encoder"])) != text:
        raise DataError(f"{path}: a cache of {'audio' if text else 'captions'}, not of "
                        f"{'captions' if text else 'audio'}; use another {flag}")
    found = read_named(path, list(names) + ["encoder"])
    if str(found["encoder"]) != encoder:
        raise DataError(f"{path}: written by encoder {str(found['encoder'])!r}, not {encoder!r}; use another {flag}")
    if any(len(found[k]) != len(found["emb"]) for k in names):
        raise DataError(f"{path}: columns of different lengths ({', '.join(f'{k} {len(found[k])}' for k in names)})")
    kind = {"ids": str, "captions": str, "caption_no": int}   # numpy scalars -> Python values
    return {k: [kind[k](x) for x in found[k]] if k in kind else list(found[k]) for k in names}


def write_cache(path: str, cache: dict[str, list], encoder: str, shard: Shard = None) -> None:
    """Rewrite a cache (emb, ids[, captions, caption_no]) atomically; a part records its shard "i/n"."""
    emb = np.stack(cache["emb"]).astype(np.float32) if cache["emb"] else np.zeros((0, 0), np.float32)
    arrays = {"emb": emb, "ids": np.array(cache["ids"], dtype=str), "encoder": np.array(encoder)}
    if "captions" in cache:
        arrays.update(captions=np.array(cache["captions"], dtype=str), caption_no=np.array(cache["caption_no"], np.int64))
    if shard is not None:
        arrays["shard"] = np.array(f"{shard[0]}/{shard[1]}")
    atomic_write(path, lambda f: np.savez(f, **arrays))


def in_shard(file_id: str, shard: Shard) -> bool:
    """Whether an audio id is in shard (i, n) (None: one process), by a stable hash: adding files moves none."""
    return shard is None or id_hash(file_id) % shard[1] == shard[0]


def part_path(out: str, shard: tuple[int, int]) -> str:
    """Where shard (i, n) of cache `out` is written: CACHE.npz -> CACHE.part-i-of-n.npz."""
    return f"{out[:-len('.npz')]}.part-{shard[0]}-of-{shard[1]}.npz"


def _embed_into(out: str, cache: dict[str, list], todo: list, embed, batch_size: int, save_every: int,
                encoder: str, shard, desc: str) -> int:
    """Embed `todo` into `cache` by embed(batch) -> (emb (B, D), {column: B values}), rewriting `out` every
    save_every batches and at the end, also when a batch fails or on Ctrl-C; returns len(todo)."""
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
                write_cache(out, cache, encoder, shard)
                saved = len(cache["ids"])
    finally:
        n = min(len(v) for v in cache.values())   # a batch stopped half-way: cut every column to one length
        for k in cache:
            del cache[k][n:]
        if n > saved or (shard is not None and not os.path.exists(out)):   # an empty shard still says so
            write_cache(out, cache, encoder, shard)
    return len(todo)


def extract(audio_dir: str, out: str, encoder, batch_size: int = 16, save_every: int = 50,
            shard: Shard = None, files: Optional[list[tuple[str, str]]] = None) -> int:
    """Embed the audio files (files, or all below audio_dir) of `shard` not yet in `out`; returns how many."""
    files = find_audio(audio_dir) if files is None else files
    cache = load_cache(out, encoder.name)
    done = set(cache["ids"])
    todo = [(i, p) for i, p in files if i not in done and in_shard(i, shard)]
    window = int(round(encoder.sample_rate * encoder.clip_seconds))

    def embed(batch):
        return encoder.embed_audio([read_audio(p, encoder.sample_rate, window) for _, p in batch]), {"ids": [i for i, _ in batch]}
    return _embed_into(out, cache, todo, embed, batch_size, save_every, encoder.name, shard, f"{encoder.name} audio")


def captions_todo(captions: list[Caption], cache: dict[str, list], out: str, shard: Shard = None,
                  source: str = "captions") -> list[Caption]:
    """The captions of `shard` not yet in `cache`, sorted; one there with other text: DataError naming `source`."""
    have = {(i, n): t for i, n, t in zip(cache["ids"], cache["caption_no"], cache["captions"])}
    todo = []
    for cid, n, text in sorted(c for c in captions if in_shard(c[0], shard)):
        old = have.get((cid, n))
        if old is None:
            todo.append((cid, n, text))
        elif old != text:
            raise DataError(f"{source}: caption {n + 1} of {cid!r} is {text[:60]!r}, but {out} holds "
                            f"{old[:60]!r} for it; use another --text-out")
    return todo


def extract_captions(captions: list[Caption], out: str, encoder, batch_size: int = 16, save_every: int = 50,
                     shard: Shard = None, source: str = "captions") -> int:
    """Embed the captions of `shard` not yet in `out`; returns how many."""
    if not getattr(encoder, "has_text", False):
        raise DataError(f"--encoder {encoder.name} embeds audio only; captions need --encoder hf-clap or laion-clap")
    cache = load_cache(out, encoder.name, text=True)
    todo = captions_todo(captions, cache, out, shard, source)

    def embed(batch):
        ids, numbers, texts = (list(c) for c in zip(*batch))
        return encoder.embed_text(texts), {"ids": ids, "caption_no": numbers, "captions": texts}
    return _embed_into(out, cache, todo, embed, batch_size, save_every, encoder.name, shard, f"{encoder.name} captions")


def merge(parts: list[str], out: str, audio_dir: str | None = None, expect: Optional[set] = None) -> int:
    """Join shard caches into `out`, rows sorted by key (as one process writes them); returns the row count. Refuses
    mixed parts, a shard twice or missing, a row in two parts or in none (`expect`ed keys, else audio_dir's files)."""
    encoders, shards, kinds, merged, owner = set(), {}, set(), defaultdict(list), {}
    for path in parts:
        meta = read_named(path, ["encoder", "shard"])
        text = "captions" in meta
        kinds.add("captions" if text else "audio")
        encoders.add(str(meta["encoder"]))
        i, n = (int(x) for x in str(meta["shard"]).split("/"))
        if (i, n) in shards:
            raise DataError(f"{path}: shard {i}/{n} is also in {shards[(i, n)]}")
        shards[(i, n)] = path
        part = load_cache(path, str(meta["encoder"]), text)
        for key in zip(part["ids"], part["caption_no"]) if text else part["ids"]:
            if key in owner:
                raise DataError(f"{path}: {'caption' if text else 'id'} {key!r} is also in {owner[key]}")
            owner[key] = path
            merged["key"].append(key)
        for c, values in part.items():
            merged[c] += values
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
    absent = sorted(set(expect or ()) - set(owner))
    if absent:
        raise DataError(f"{audio_dir or out}: {len(absent)} {'files' if kinds == {'audio'} else 'captions'} are in no "
                        f"part, e.g. {', '.join(map(str, absent[:3]))}")
    cols = ("emb", "ids") + (TEXT_COLUMNS if kinds == {"captions"} else ())
    order = sorted(range(len(merged["key"])), key=merged["key"].__getitem__)
    write_cache(out, {c: [merged[c][k] for k in order] for c in cols}, encoders.pop())
    return len(order)


def data_spec(audio: str, text: str, encoder: str) -> tuple[str, str]:
    """(the --data spec that trains on an audio and a caption cache, a note on unpaired ids)."""
    a_ids, t_ids = set(load_cache(audio, encoder)["ids"]), set(load_cache(text, encoder, text=True)["ids"])
    spec = f"clap:audio={audio},text={text},text_key=emb"
    if a_ids ^ t_ids:
        return spec + ",drop_unpaired=1", (f"{len(a_ids - t_ids)} audio ids without captions and {len(t_ids - a_ids)} "
                                           f"caption ids without audio in these caches: drop_unpaired=1 leaves them out")
    return spec, ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio-dir", help="folder of audio files (with --merge: check that each file or caption is in a part)")
    p.add_argument("--out", required=True, help="audio cache .npz, resumed when it exists (a shard: OUT.part-I-of-N.npz)")
    p.add_argument("--captions", help="caption file (.csv or .json): embed its captions and the audio files they name")
    p.add_argument("--text-out", help="caption cache .npz (default: OUT with .captions.npz)")
    p.add_argument("--id-col", help=f"column naming each caption's audio file (default: the first of {', '.join(ID_COLUMNS)}), "
                                    f"or a template like '{{youtube_id}}_{{start_time}}'")
    p.add_argument("--caption-col", help="caption columns, comma-separated (default: caption, caption_1, ...)")
    p.add_argument("--skip-missing", action="store_true", help="leave out captions whose audio file is not there")
    p.add_argument("--shard", help="I/N: embed shard I of N (a stable split by id; torchrun: RANK/WORLD_SIZE)")
    p.add_argument("--merge", nargs="+", metavar="PART", help="join the shard parts of one cache into --out")
    p.add_argument("--encoder", choices=("logmel", "hf-clap", "musicldm", "laion-clap"), default="logmel",
                   help="logmel (no weights, audio only), hf-clap (transformers), musicldm (a MusicLDM pipeline's own "
                        "CLAP, for generate.py), laion-clap (pip install laion_clap)")
    p.add_argument("--model", help="hf-clap: hub id or folder (default laion/clap-htsat-unfused); musicldm: the pipeline "
                                   "(default ucsd-reach/musicldm); laion-clap: audio tower, HTSAT-tiny (default) or HTSAT-base")
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
        if not args.audio_dir and (args.captions or not args.merge):
            raise DataError("--audio-dir is required (--merge needs it only with --captions)")
        if args.merge:
            expect = None
            if args.captions:
                plan = make_plan(args.audio_dir, args.captions, args.id_col, cols, args.skip_missing)
                text = "captions" in read_named(args.merge[0], ["encoder"])
                expect = {(i, n) for i, n, _ in plan.captions} if text else {i for i, _ in plan.files}
            rows = merge(args.merge, args.out, args.audio_dir, expect)
            print(f"{args.out}: {rows} embeddings from {len(args.merge)} parts")
            return 0
        if args.captions and args.encoder == "logmel":
            raise DataError("--encoder logmel embeds audio only; captions need --encoder hf-clap or laion-clap")
        if args.shard is None:   # one process, or torchrun's RANK / WORLD_SIZE
            world = int(os.environ.get("WORLD_SIZE", "1"))
            shard = (int(os.environ["RANK"]), world) if world > 1 else None
        else:
            i, sep, n = args.shard.partition("/")
            if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
                raise DataError(f"--shard {args.shard}: use I/N with 0 <= I < N, e.g. --shard 0/4")
            shard = int(i), int(n)
        plan = make_plan(args.audio_dir, args.captions, args.id_col, cols, args.skip_missing)   # before any weights load
        out = args.out if shard is None else part_path(args.out, shard)
        text_part = None if args.captions is None else text_out if shard is None else part_path(text_out, shard)
        encoder = (LogMelEncoder() if args.encoder == "logmel" else   # DataError if it cannot be set up
                   HFClapEncoder.load(args.model or "laion/clap-htsat-unfused", args.device) if args.encoder == "hf-clap" else
                   HFClapEncoder.load(args.model or "ucsd-reach/musicldm", args.device, True) if args.encoder == "musicldm" else
                   LaionClapEncoder(args.checkpoint, args.model or "HTSAT-tiny", args.fusion, args.device))
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
        t_added = extract_captions(plan.captions, text_part, encoder, args.batch_size, args.save_every, shard, args.captions)
        cache = load_cache(text_part, encoder.name, text=True)
        print(f"{text_part}: {len(cache['ids'])} caption embeddings ({t_added} new, {len(cache['ids']) - t_added} "
              f"already there) of {len(set(cache['ids']))} audio ids")
        if plan.skipped:
            print(f"{args.captions}: {plan.skipped} captions left out: their audio file is not in {args.audio_dir} "
                  f"(--skip-missing)")
        if shard is not None:
            merge_args = f"--audio-dir {args.audio_dir} --captions {args.captions}" + \
                         (f" --id-col '{args.id_col}'" if args.id_col else "") + (" --skip-missing" if args.skip_missing else "")
            for cache_out in (args.out, text_out):
                print(f"when all {shard[1]} shards are done: python -m embed_cache.extract --merge "
                      f"{cache_out[:-4]}.part-*-of-{shard[1]}.npz --out {cache_out} {merge_args}")
            return 0
        spec, note = data_spec(out, text_part, encoder.name)
        if note:
            print(note)
        print(f"train on them: python train.py --pair audio-text --data {spec}")
    except ValueError as e:   # DataError, and pick_device's --device cuda without CUDA
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
