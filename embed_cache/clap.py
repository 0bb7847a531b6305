"""LAION-CLAP / MS-CLAP audio and text embeddings.

    clap:audio=audio.npy,text=text.npy            (N, D) and (5N, D): captions contiguous,
                                                  text rows 5d..5d+4 belong to audio d
    clap:audio=audio.npy,text=text.npy,audio_ids=audio.csv,text_ids=captions.csv,id_col=audio_id
                                                  explicit caption -> audio id mapping
    clap:audio=emb.npz,text=emb.npz,audio_key=audio,text_key=text

Neither CLAP package writes a cache file: users save what `get_audio_embedding_from_filelist`
and `get_text_embedding` return with np.save / np.savez / torch.save. Without ids, the number
of captions per audio is N_text / N_audio (it must divide; AudioCaps and Clotho test sets use
5), or per_audio=K. Every other option of the arrays format applies (drop_bad, val, ...).
"""
from __future__ import annotations

from .arrays import load_arrays
from .base import DataError, Dataset

RENAME = {"audio": "a", "text": "b", "audio_key": "a_key", "text_key": "b_key", "audio_ids": "a_ids",
          "text_ids": "b_ids", "per_audio": "per_a"}


def load_clap(opts: dict, pair: str, spec: str) -> Dataset:
    if pair != "audio-text":
        raise DataError(f"{spec}: CLAP embeddings are audio-text; use --pair audio-text")
    if "audio" not in opts or "text" not in opts:
        raise DataError(f"{spec}: give audio=PATH,text=PATH")
    opts = {RENAME.get(k, k): v for k, v in opts.items()}
    if not any(k in opts for k in ("ids", "a_ids", "b_ids", "per_a")):
        opts["per_a"] = "auto"   # captions contiguous, N_text / N_audio per audio
    return load_arrays(opts, pair, spec)
