"""Audio files -> embedding cache (embed_cache.extract), and the whole pipeline through the CLIs."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import embed_cache
from embed_cache import DataError
from embed_cache.extract import LogMelEncoder, extract, fit_length, main, resample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FREQS = (220.0, 660.0, 1800.0)   # one tone per class


def write_clips(folder, n=60, seed=0):
    """n short clips in 3 classes (a tone + noise), mixed rates, channels and formats; -> {id: class}."""
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        c, sr = i % 3, (8000, 16000, 22050)[i % 4 % 3]
        t = np.arange(int(sr * rng.uniform(0.5, 1.5))) / sr
        x = 0.5 * np.sin(2 * np.pi * FREQS[c] * t) + 0.05 * rng.normal(size=t.shape)
        if i % 5 == 0:
            x = np.stack([x, 0.8 * x], axis=1)                  # stereo: mixed down on read
        sub = os.path.join(folder, f"part{i % 2}")
        os.makedirs(sub, exist_ok=True)
        sf.write(os.path.join(sub, f"clip{i:03d}.{'flac' if i % 7 == 0 else 'wav'}"), x.astype(np.float32), sr)
        labels[f"part{i % 2}/clip{i:03d}"] = c
    return labels


def test_resample_keeps_the_tone_and_fit_length_repeats():
    sr_in, sr_out, f = 8000, 16000, 440.0
    x = np.sin(2 * np.pi * f * np.arange(8000) / sr_in).astype(np.float32)
    y = resample(x, sr_in, sr_out)
    assert len(y) == 16000
    assert np.allclose(y, np.sin(2 * np.pi * f * np.arange(16000) / sr_out), atol=1e-3)
    assert np.array_equal(fit_length(np.array([1, 2, 3], np.float32), 7), [1, 2, 3, 1, 2, 3, 1])
    assert np.array_equal(fit_length(np.arange(10, dtype=np.float32), 4), [0, 1, 2, 3])


def test_logmel_encoder_is_deterministic_and_separates_tones():
    enc = LogMelEncoder()
    n = int(enc.sample_rate * enc.clip_seconds)
    t = np.arange(n) / enc.sample_rate
    rng = np.random.default_rng(0)
    audio = np.stack([np.sin(2 * np.pi * f * t) + 0.05 * rng.normal(size=n) for f in (220, 220, 1800)]).astype(np.float32)
    e = enc.embed(audio)
    assert e.shape == (3, 512) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(e, LogMelEncoder().embed(audio), atol=1e-6)
    assert e[0] @ e[1] > 0.99 > e[0] @ e[2]


def test_extract_resumes_and_a_bad_file_keeps_the_cache(tmp_path):
    labels = write_clips(tmp_path / "wav", n=12)
    out = str(tmp_path / "audio.npz")
    assert extract(str(tmp_path / "wav"), out, LogMelEncoder(), batch_size=4) == 12
    first = np.load(out)
    assert sorted(first["ids"]) == sorted(labels) and first["emb"].shape == (12, 512)
    assert extract(str(tmp_path / "wav"), out, LogMelEncoder()) == 0          # nothing left to do
    (tmp_path / "wav" / "zz_broken.wav").write_bytes(b"RIFF not really a wav")
    write_clips(tmp_path / "more", n=3)
    os.rename(tmp_path / "more" / "part1" / "clip001.wav", tmp_path / "wav" / "new.wav")
    with pytest.raises(DataError, match=r"zz_broken\.wav: cannot read audio"):
        extract(str(tmp_path / "wav"), out, LogMelEncoder(), batch_size=1)
    kept = np.load(out)  # the clip embedded before the broken one was saved; the old rows are intact
    assert "new" in list(kept["ids"]) and len(kept["ids"]) == 13
    assert np.array_equal(kept["emb"][:12], first["emb"])


def run(args, cwd):
    r = subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_wav_to_extract_to_train_to_sample(tmp_path):
    """The whole pipeline through the command lines, offline: the acceptance test of embed_cache."""
    labels = write_clips(tmp_path / "wav", n=90)
    out = run(["-m", "embed_cache.extract", "--audio-dir", "wav", "--out", "audio.npz", "--batch-size", "8"], tmp_path)
    assert "audio.npz: 90 audio embeddings (90 new, 0 already there), encoder logmel" in out
    # the other modality: a "video" embedding per clip from its class, in another order
    rng = np.random.default_rng(1)
    protos = rng.normal(size=(3, 64))
    ids = sorted(labels, reverse=True)
    video = np.stack([protos[labels[i]] + 0.3 * rng.normal(size=64) for i in ids]).astype(np.float32)
    np.savez(tmp_path / "video.npz", emb=video, ids=np.array(ids))
    spec = "arrays:a=audio.npz,b=video.npz,val=0.2,test=0.2"
    out = run([os.path.join(ROOT, "train.py"), "--pair", "audio-video", "--data", spec, "--epochs", "20",
               "--batch-size", "16", "--switch-every", "10", "--num-samples", "2"], tmp_path)
    sizes = re.search(r"train: (\d+) audio / \1 video, val: (\d+) audio / \2 video, test: (\d+) audio / \3 video", out)
    assert sizes and sum(map(int, sizes.groups())) == 90, out
    assert (tmp_path / "runs" / "audio-video" / "ckpt.pt").exists()
    out = run([os.path.join(ROOT, "sample.py"), "--steps", "5", "--num-samples", "2"], tmp_path)
    assert f"test: {sizes.group(3)} audio" in out and "test retrieval (%), 5 ddim steps" in out
    for direction in ("B->A", "A->B"):
        # val R@1, R@1 [95% CI], R@5, R@10; unequal dims: no contrastive, so diffgap and two-way only
        row = re.search(rf"{re.escape(direction)}\s+diffgap(?: \*)?\s+[\d.]+\s+([\d.]+)\s+\[[\d., ]+\]\s+([\d.]+)\s+([\d.]+)", out)
        assert row and 0 <= float(row.group(1)) <= float(row.group(3)) <= 100, out
    # the test split sample.py used is the one the spec gives
    ds = embed_cache.load(spec.replace("audio.npz", str(tmp_path / "audio.npz")).replace("video.npz", str(tmp_path / "video.npz")), "audio-video")
    assert len(ds.splits["test"].a) == int(sizes.group(3))
