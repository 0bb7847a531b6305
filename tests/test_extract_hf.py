"""Hugging Face transformers CLAP: audio files + captions -> embeddings -> train.py -> sample.py.

A small ClapModel with random weights and a byte-level tokenizer made here, saved with
save_pretrained: nothing comes from the hub.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from embed_cache.extract import load_cache, main, resample

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW_S = 1        # the tiny model's max_length_s: clips longer than 1 s are cut, shorter ones repeat-padded
FREQS = (300.0, 900.0, 2500.0)
WORDS = ("low hum", "middle tone", "high whistle")


def tiny_clap(folder, fusion=False, width=16):
    """A small random ClapModel (embeddings of `width`) + ClapProcessor (48 kHz, 1 s window) saved to folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    tokenizer = transformers.RobertaTokenizer(vocab=vocab, merges=[])       # byte level, no merges
    text = transformers.ClapTextConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=37, max_position_embeddings=130, projection_dim=width)
    audio = transformers.ClapAudioConfig(spec_size=128, freq_ratio=2, window_size=4, patch_size=4, patch_stride=(4, 4), depths=[1, 1],
                                         num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=32,
                                         patch_embeds_hidden_size=16, projection_dim=width, enable_fusion=fusion,
                                         fusion_type="aff_2d" if fusion else None)   # as LAION's fused checkpoints
    torch.manual_seed(0)
    model = transformers.ClapModel(transformers.ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(),
                                                           projection_dim=width))
    features = transformers.ClapFeatureExtractor(sampling_rate=48000, max_length_s=WINDOW_S,
                                                 truncation="fusion" if fusion else "rand_trunc")
    transformers.ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_clap(tmp_path_factory.mktemp("clap") / "tiny-clap")


def write_dataset(folder, n=20, seed=0):
    """n clips (mono and stereo; 16, 22.05, 44.1 and 48 kHz; 0.4 to 1.6 s) and a Clotho-layout CSV, 5 captions each
    of different lengths (so that a batch of captions is padded)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "clips", exist_ok=True)
    lines = ["file_name," + ",".join(f"caption_{j}" for j in range(1, 6))]
    for i in range(n):
        c, sr = i % 3, (16000, 22050, 44100, 48000)[i % 4]
        t = np.arange(int(sr * rng.uniform(0.4, 1.6))) / sr
        x = 0.5 * np.sin(2 * np.pi * FREQS[c] * t) + 0.05 * rng.normal(size=t.shape)
        if i % 3 == 1:
            x = np.stack([x, 0.6 * x], axis=1)
        sf.write(folder / "clips" / f"clip{i:02d}.{'flac' if i % 5 == 0 else 'wav'}", x.astype(np.float32), sr)
        lines.append(f"clip{i:02d}.wav," + ",".join(f"\"a {WORDS[c]}{' again' * j}, take {j} of clip {i}\"" for j in range(5)))
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")


def reference_audio(model_dir, paths):
    """ClapModel.get_audio_features on the clips as the extraction must feed them: mono, 48 kHz, first window."""
    processor = transformers.ClapProcessor.from_pretrained(model_dir)
    model = transformers.ClapModel.from_pretrained(model_dir).eval()
    clips = []
    for p in paths:
        x, sr = sf.read(p, dtype="float32", always_2d=True)
        x = x[:int(np.ceil(WINDOW_S * sr))]   # the frames that become the first window: all that is read
        clips.append(resample(x.mean(1), sr, 48000)[:48000 * WINDOW_S])
    inputs = processor.feature_extractor(clips, sampling_rate=48000, return_tensors="pt")
    with torch.no_grad():
        out = model.get_audio_features(**inputs)
    return torch.nn.functional.normalize(out.pooler_output, dim=1).numpy()


def reference_text(model_dir, captions):
    processor = transformers.ClapProcessor.from_pretrained(model_dir)
    model = transformers.ClapModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.get_text_features(**processor.tokenizer(captions, padding=True, return_tensors="pt"))
    return torch.nn.functional.normalize(out.pooler_output, dim=1).numpy()


def run(args, cwd, **env):
    r = subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_audio_and_captions_to_trained_model_and_ranking(model_dir, tmp_path):
    write_dataset(tmp_path)
    out = run(["-m", "embed_cache.extract", "--encoder", "hf-clap", "--model", model_dir, "--audio-dir", "clips",
               "--captions", "captions.csv", "--out", "audio.npz", "--batch-size", "5"], tmp_path)
    assert "audio.npz: 20 audio embeddings (20 new, 0 already there), encoder hf-clap:" in out
    assert "audio.captions.npz: 100 caption embeddings (100 new, 0 already there) of 20 audio ids" in out
    spec = re.search(r"train on them: python train\.py --pair audio-text --data (\S+)$", out.strip()).group(1)
    assert spec == "clap:audio=audio.npz,text=audio.captions.npz,text_key=emb"

    # the vectors are ClapModel's own, as unit vectors, and each row keeps its id
    name = f"hf-clap:{model_dir}"
    audio, text = load_cache(str(tmp_path / "audio.npz"), name), load_cache(str(tmp_path / "audio.captions.npz"), name, text=True)
    ext = {i: ("flac" if int(i[4:]) % 5 == 0 else "wav") for i in audio["ids"]}
    want = reference_audio(model_dir, [str(tmp_path / "clips" / f"{i}.{ext[i]}") for i in audio["ids"]])
    assert sorted(audio["ids"]) == [f"clip{i:02d}" for i in range(20)]
    assert np.allclose(np.stack(audio["emb"]), want, atol=1e-5)
    assert np.allclose(np.stack(text["emb"]), reference_text(model_dir, text["captions"]), atol=1e-5)
    for i, n, caption in zip(text["ids"], text["caption_no"], text["captions"]):
        assert caption.endswith(f"take {n} of clip {int(i[4:])}")
    # resumed: nothing left to do
    again = run(["-m", "embed_cache.extract", "--encoder", "hf-clap", "--model", model_dir, "--audio-dir", "clips",
                 "--captions", "captions.csv", "--out", "audio.npz"], tmp_path)
    assert "(0 new, 20 already there)" in again and "(0 new, 100 already there)" in again

    spec += ",val=0.3,test=0.3"          # 12 / 6 / 2 clips by the id hash
    out = run([os.path.join(ROOT, "train.py"), "--pair", "audio-text", "--data", spec, "--min-steps", "12",
               "--batch-size", "16", "--switch-every", "6", "--no-eval"], tmp_path)
    sizes = re.search(r"train: (\d+) audio / (\d+) text, val: (\d+) audio / (\d+) text, test: (\d+) audio / (\d+) text", out)
    assert sizes, out
    a_train, t_train, a_val, t_val, a_test, t_test = map(int, sizes.groups())
    assert a_train + a_val + a_test == 20 and (t_train, t_val, t_test) == (5 * a_train, 5 * a_val, 5 * a_test)
    out = run([os.path.join(ROOT, "sample.py"), "--steps", "5", "--num-samples", "1"], tmp_path)
    assert "test retrieval (%), 5 ddim steps" in out
    for direction in ("B->A", "A->B"):    # text->audio and audio->text, five relevant captions per clip
        row = re.search(rf"{re.escape(direction)}\s+contrastive(?: \*)?\s+[\d.]+\s+([\d.]+)\s+\[[\d., ]+\]\s+([\d.]+)\s+([\d.]+)", out)
        assert row and 0 <= float(row.group(1)) <= float(row.group(2)) <= float(row.group(3)) <= 100, out


def test_shards_and_merges_from_the_command_line_equal_one_process(model_dir, tmp_path, capsys):
    write_dataset(tmp_path, n=8)
    common = ["--encoder", "hf-clap", "--model", model_dir, "--audio-dir", str(tmp_path / "clips"),
              "--captions", str(tmp_path / "captions.csv"), "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "one.npz")]) == 0
    for i in range(2):
        assert main(common + ["--out", str(tmp_path / "s.npz"), "--shard", f"{i}/2"]) == 0
    out = capsys.readouterr().out
    assert f"when all 2 shards are done: python -m embed_cache.extract --merge {tmp_path / 's.captions'}.part-*-of-2.npz" in out
    for cache in ("s", "s.captions"):
        parts = [str(tmp_path / f"{cache}.part-{i}-of-2.npz") for i in range(2)]
        assert main(["--merge", *parts, "--out", str(tmp_path / f"{cache}.npz"), "--audio-dir", str(tmp_path / "clips"),
                     "--captions", str(tmp_path / "captions.csv")]) == 0
    name = f"hf-clap:{model_dir}"
    for one, merged, text in (("one.npz", "s.npz", False), ("one.captions.npz", "s.captions.npz", True)):
        a, b = load_cache(str(tmp_path / one), name, text), load_cache(str(tmp_path / merged), name, text)
        assert a["ids"] == b["ids"] and np.allclose(np.stack(a["emb"]), np.stack(b["emb"]), atol=1e-5)
    (tmp_path / "captions.csv").write_text((tmp_path / "captions.csv").read_text() + "clip03.wav,one more\n")
    parts = [str(tmp_path / f"s.captions.part-{i}-of-2.npz") for i in range(2)]
    assert main(["--merge", *parts, "--out", str(tmp_path / "bad.npz"), "--audio-dir", str(tmp_path / "clips"),
                 "--captions", str(tmp_path / "captions.csv")]) == 2
    assert "1 captions are in no part, e.g. ('clip03', 5)" in capsys.readouterr().err


def test_fusion_checkpoints_embed_the_same_every_time(tmp_path):
    """A fusion feature extractor flags a random clip of each batch as longer; extraction must not."""
    from embed_cache.extract import HFClapEncoder
    enc = HFClapEncoder.load(tiny_clap(tmp_path / "fused", fusion=True), device="cpu")
    rng = np.random.default_rng(0)
    clips = [rng.normal(size=n).astype(np.float32) * 0.1 for n in (20000, 48000, 30000)]
    first = enc.embed_audio(clips)
    for seed in range(4):
        np.random.seed(seed)
        assert np.array_equal(enc.embed_audio(clips), first)
    inputs = enc.fe(clips, sampling_rate=48000, return_tensors="pt")
    inputs["is_longer"][:] = False
    with torch.no_grad():
        want = enc.model.get_audio_features(**inputs).pooler_output
    assert np.allclose(first, torch.nn.functional.normalize(want, dim=1).numpy(), atol=1e-6)


def test_a_model_not_found_offline_is_one_line_and_writes_nothing(tmp_path):
    write_dataset(tmp_path, n=3)
    r = subprocess.run([sys.executable, "-m", "embed_cache.extract", "--encoder", "hf-clap", "--model", "laion/clap-htsat-unfused",
                        "--audio-dir", "clips", "--captions", "captions.csv", "--out", "audio.npz"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --model laion/clap-htsat-unfused: not in the Hugging Face cache"), r.stderr
    assert "hf download laion/clap-htsat-unfused" in r.stderr, r.stderr
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npz")]


def test_a_model_path_that_is_not_there_is_one_line(tmp_path, capsys):
    write_dataset(tmp_path, n=2)
    assert main(["--encoder", "hf-clap", "--model", "./no/such/folder", "--audio-dir", str(tmp_path / "clips"),
                 "--out", str(tmp_path / "a.npz")]) == 2
    assert capsys.readouterr().err == ("error: --model ./no/such/folder: no such folder, and not a hub id like "
                                       "laion/clap-htsat-unfused\n")
    (tmp_path / "empty").mkdir()   # a folder, but nothing save_pretrained wrote
    assert main(["--encoder", "hf-clap", "--model", str(tmp_path / "empty"), "--audio-dir", str(tmp_path / "clips"),
                 "--out", str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {tmp_path / 'empty'}: a folder, but not a CLAP saved with save_pretrained (") \
        and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a.npz").exists()


def test_transformers_missing_is_one_line(tmp_path, monkeypatch, capsys):
    write_dataset(tmp_path, n=2)
    monkeypatch.setitem(sys.modules, "transformers", None)      # as if it were not installed
    assert main(["--encoder", "hf-clap", "--audio-dir", str(tmp_path / "clips"), "--out", str(tmp_path / "a.npz")]) == 2
    assert capsys.readouterr().err == ("error: --encoder hf-clap needs the transformers package: pip install transformers "
                                       "(--encoder logmel needs nothing)\n")
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    write_dataset(tmp_path, n=2)
    assert main(["--encoder", "hf-clap", "--model", str(tmp_path / "none"), "--device", "cuda", "--audio-dir",
                 str(tmp_path / "clips"), "--out", str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a.npz").exists()
