"""Embed a folder of audio files into a cache that the loaders read.

    python -m embed_cache.extract --audio-dir clips/ --out audio.npz                  # built-in logmel
    python -m embed_cache.extract --audio-dir clips/ --out audio.npz --encoder clap --checkpoint 630k-audioset-best.pt

Reads .wav / .flac / .ogg with soundfile, mixes down to mono, resamples to the encoder's rate,
crops or repeat-pads to its clip length, and embeds in batches with a progress bar. The cache
is one .npz with `emb` (N, D) float32 and `ids` (N,) (each file's path below --audio-dir,
without extension), the generic format: train on it with
`--data arrays:a=audio.npz,b=<other modality>.npz` (pairs by the `ids` arrays).
Resumable: ids already in --out are skipped. The cache is rewritten atomically (temp file,
then rename) every --save-every batches and at the end, so a crash never leaves a broken file.

Encoders are pluggable (ENCODERS). `logmel` is a small deterministic encoder (log-mel
statistics through a fixed random projection) for tests and pipelines without weights; it is
not a semantic embedding. `clap` runs LAION-CLAP when `laion_clap` is installed and a local
checkpoint is given; nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from diffgap import atomic_write

from .arrays import id_hash, read_named
from .base import DataError

AUDIO_EXTS = (".wav", ".flac", ".ogg")


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


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Crop to the first n samples, or repeat the clip until it fills n (CLAP's 'repeatpad')."""
    if len(x) >= n:
        return x[:n]
    if len(x) == 0:
        return np.zeros(n, dtype=np.float32)
    return np.tile(x, math.ceil(n / len(x)))[:n]


def read_audio(path: str, sample_rate: int, clip_samples: int) -> np.ndarray:
    import soundfile as sf
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)          # (T, channels)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError on bad files
        raise DataError(f"{path}: cannot read audio ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not np.isfinite(x).all():
        raise DataError(f"{path}: audio has NaN or Inf samples")
    return fit_length(resample(x.mean(1), sr, sample_rate), clip_samples)


# ----------------------------------------------------------------------------------------
# Encoders: sample_rate, clip_seconds, name, embed((B, T) float32) -> (B, D)
# ----------------------------------------------------------------------------------------

def mel_filterbank(n_mels: int, n_fft: int, sr: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    edges = hz(np.linspace(mel(0), mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.from_numpy(fb).float()


class LogMelEncoder:
    """Mean and std over time of 64 log-mel bands, through a fixed random projection to `dim`."""
    name, sample_rate, clip_seconds = "logmel", 16000, 5.0

    def __init__(self, dim: int = 512, n_fft: int = 512, hop: int = 256, n_mels: int = 64):
        self.n_fft, self.hop = n_fft, hop
        self.fb = mel_filterbank(n_mels, n_fft, self.sample_rate)
        g = torch.Generator().manual_seed(0)   # the same projection on every machine and run
        self.proj = torch.randn(2 * n_mels, dim, generator=g) / math.sqrt(2 * n_mels)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(audio)                                                   # (B, T)
        spec = torch.stft(x, self.n_fft, self.hop, window=torch.hann_window(self.n_fft), return_complex=True)
        logmel = torch.log(self.fb @ spec.abs().pow(2) + 1e-6)                        # (B, mels, frames)
        stats = torch.cat([logmel.mean(-1), logmel.std(-1)], dim=1)                   # (B, 2 mels)
        stats = stats - stats.mean(1, keepdim=True)
        return torch.nn.functional.normalize(stats @ self.proj, dim=1).numpy()


class ClapEncoder:
    """LAION-CLAP audio tower (48 kHz, 10 s clips); needs `laion_clap` and a local checkpoint."""
    name, sample_rate, clip_seconds = "clap", 48000, 10.0

    def __init__(self, checkpoint: str | None, amodel: str = "HTSAT-tiny"):
        if not checkpoint or not os.path.isfile(checkpoint):
            raise DataError(f"--encoder clap needs --checkpoint PATH to a local LAION-CLAP .pt file "
                            f"({checkpoint or 'none given'}); nothing is downloaded")
        try:
            import laion_clap
        except ImportError:
            raise DataError("--encoder clap needs the laion_clap package (pip install laion_clap); "
                            "--encoder logmel needs nothing") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # its text tokenizer must come from a local cache
        self.model = laion_clap.CLAP_Module(enable_fusion=False, amodel=amodel)
        self.model.load_ckpt(checkpoint, verbose=False)

    def embed(self, audio: np.ndarray) -> np.ndarray:
        # CLAP was trained on int16 audio: quantise as its own examples do
        audio = (np.clip(audio, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32767
        return self.model.get_audio_embedding_from_data(x=audio, use_tensor=False)


ENCODERS = {"logmel": lambda args: LogMelEncoder(), "clap": lambda args: ClapEncoder(args.checkpoint)}


# ----------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------

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


def read_cache(path: str, encoder: str) -> tuple[list[str], list[np.ndarray]]:
    """(ids, rows) already in an existing cache, checked to come from the same encoder."""
    if not os.path.exists(path):
        return [], []
    found = read_named(path, ["emb", "ids", "encoder"])
    if str(found["encoder"]) != encoder:
        raise DataError(f"{path}: written by encoder {str(found['encoder'])!r}, not {encoder!r}; use another --out")
    if len(found["ids"]) != len(found["emb"]):
        raise DataError(f"{path}: {len(found['emb'])} rows but {len(found['ids'])} ids")
    return [str(i) for i in found["ids"]], list(found["emb"])


def write_cache(path: str, ids: list[str], rows: list[np.ndarray], encoder: str,
                shard: tuple[int, int] | None = None) -> None:
    """Rewrite the cache atomically and durably (temp file, fsync, rename, fsync of the folder).

    A shard's part also records which shard it is ("i/n"), so that merge() can check the parts.
    """
    emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    extra = {} if shard is None else {"shard": np.array(f"{shard[0]}/{shard[1]}")}
    atomic_write(path, lambda f: np.savez(f, emb=emb, ids=np.array(ids, dtype=str), encoder=np.array(encoder), **extra))


def in_shard(file_id: str, shard: tuple[int, int]) -> bool:
    """Whether a file belongs to shard (i, n): a stable hash of its id, so adding files moves none."""
    i, n = shard
    return id_hash(file_id) % n == i


def part_path(out: str, shard: tuple[int, int]) -> str:
    """Where shard (i, n) of cache `out` is written: CACHE.npz -> CACHE.part-i-of-n.npz."""
    return f"{out[:-len('.npz')]}.part-{shard[0]}-of-{shard[1]}.npz"


def extract(audio_dir: str, out: str, encoder, batch_size: int = 16, save_every: int = 50,
            shard: tuple[int, int] | None = None) -> int:
    """Embed every audio file not yet in `out` (of shard (i, n) only, if given); returns how many were added."""
    files = find_audio(audio_dir)
    if shard is not None:
        files = [(i, p) for i, p in files if in_shard(i, shard)]
    ids, rows = read_cache(out, encoder.name)
    done = set(ids)
    todo = [(i, p) for i, p in files if i not in done]
    clip = int(encoder.sample_rate * encoder.clip_seconds)
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    saved = len(ids)                 # rows already in the file on disk
    try:
        for n, batch in enumerate(tqdm(batches, unit="batch", desc=f"{encoder.name} embeddings")):
            audio = np.stack([read_audio(p, encoder.sample_rate, clip) for _, p in batch])
            emb = np.asarray(encoder.embed(audio), dtype=np.float32)
            ids += [i for i, _ in batch]
            rows += list(emb)
            if (n + 1) % save_every == 0:
                write_cache(out, ids, rows, encoder.name, shard)
                saved = len(ids)
    finally:  # keep what was embedded, even when a file fails or on Ctrl-C
        if len(ids) > saved or (shard is not None and not os.path.exists(out)):   # an empty shard still says so
            write_cache(out, ids, rows, encoder.name, shard)
    return len(todo)


def merge(parts: list[str], out: str, audio_dir: str | None = None) -> int:
    """Join shard caches into `out`, rows sorted by id (as one process writes them); returns the row count.

    Refuses parts from different encoders or of different shard counts, a shard given twice or
    missing, an id in two parts, and (with audio_dir) any audio file that no part holds.
    """
    encoders, shards, ids, rows, owner = set(), {}, [], [], {}
    for path in parts:
        found = read_named(path, ["emb", "ids", "encoder", "shard"])
        encoders.add(str(found["encoder"]))
        i, n = (int(x) for x in str(found["shard"]).split("/"))
        if (i, n) in shards:
            raise DataError(f"{path}: shard {i}/{n} is also in {shards[(i, n)]}")
        shards[(i, n)] = path
        for file_id, row in zip((str(x) for x in found["ids"]), found["emb"]):
            if file_id in owner:
                raise DataError(f"{path}: id {file_id!r} is also in {owner[file_id]}")
            owner[file_id] = path
            ids.append(file_id)
            rows.append(row)
    if len(encoders) > 1:
        raise DataError(f"{', '.join(parts)}: written by different encoders ({', '.join(sorted(encoders))})")
    counts = {n for _, n in shards}
    if len(counts) > 1:
        raise DataError(f"{', '.join(parts)}: parts of different shard counts ({', '.join(map(str, sorted(counts)))})")
    n = counts.pop()
    missing = sorted(set(range(n)) - {i for i, _ in shards})
    if missing:
        raise DataError(f"shard {missing[0]}/{n} is missing: give all {n} parts ({part_path(out, (missing[0], n))})")
    if audio_dir is not None:
        absent = [i for i, _ in find_audio(audio_dir) if i not in owner]
        if absent:
            raise DataError(f"{audio_dir}: {len(absent)} files are in no part, e.g. {', '.join(absent[:3])}")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    write_cache(out, [ids[k] for k in order], [rows[k] for k in order], encoders.pop())
    return len(ids)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """--shard I/N, or torchrun's RANK / WORLD_SIZE when launched by it, or None (one process)."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ["RANK"]), world) if world > 1 else None
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise DataError(f"--shard {text}: use I/N with 0 <= I < N, e.g. --shard 0/4")
    return int(i), int(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio-dir", help="folder of audio files (with --merge: check that every file is in a part)")
    p.add_argument("--out", required=True, help="cache .npz (resumed when it exists); a shard writes OUT.part-I-of-N.npz")
    p.add_argument("--shard", help="I/N: embed only shard I of N (a stable split by file id); default under "
                                   "torchrun: RANK/WORLD_SIZE")
    p.add_argument("--merge", nargs="+", metavar="PART", help="join shard parts into --out instead of embedding")
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="logmel")
    p.add_argument("--checkpoint", help="local weights for --encoder clap")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--save-every", type=int, default=50, help="batches between cache writes")
    args = p.parse_args(argv)
    if not args.out.endswith(".npz"):
        p.error("--out must be a .npz file")
    for name in ("batch_size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        if args.merge:
            rows = merge(args.merge, args.out, args.audio_dir)
            print(f"{args.out}: {rows} embeddings from {len(args.merge)} parts")
            return 0
        if not args.audio_dir:
            p.error("--audio-dir is required (unless --merge)")
        shard = parse_shard(args.shard)
        out = args.out if shard is None else part_path(args.out, shard)
        encoder = ENCODERS[args.encoder](args)
        added = extract(args.audio_dir, out, encoder, args.batch_size, args.save_every, shard)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = len(read_cache(out, encoder.name)[0])
    print(f"{out}: {total} embeddings ({added} new, {total - added} already there), encoder {encoder.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
