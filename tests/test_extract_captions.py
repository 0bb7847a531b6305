"""Captions -> caption cache (embed_cache.extract): layouts, id matching, resume, shards, errors."""
import hashlib
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import embed_cache
from embed_cache import DataError
from embed_cache.extract import (data_spec, extract, extract_captions, load_cache, main, make_plan, merge,
                                 part_path, read_captions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeTextEncoder:
    """Deterministic both-sides encoder without weights: audio by its RMS, text by a hash of it."""
    name, sample_rate, clip_seconds, has_text = "fake", 8000, 1.0, True

    def embed_audio(self, clips):
        return np.stack([[np.sqrt(np.mean(c ** 2)), len(c) / 8000, 1.0] for c in clips])

    def embed_text(self, captions):
        return np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:12], np.uint8).astype(np.float32) + 1
                         for t in captions])


def write_wavs(folder, names, sr=8000):
    for k, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sf.write(path, (0.1 * (k + 1) * np.sin(np.arange(sr // 2) / 3)).astype(np.float32), sr)


def test_audiocaps_clotho_and_json_layouts(tmp_path):
    audiocaps = tmp_path / "audiocaps.csv"
    audiocaps.write_text("audiocap_id,youtube_id,start_time,caption\n"
                         "91139,r1nicOVtvkQ,130,A woman talks nearby\n"
                         "58146,UDGBjjwyaqE,20,Multiple clanging and clanking sounds\n"
                         "91140,r1nicOVtvkQ,130,\"A woman speaks, then a dog barks\"\n")
    assert read_captions(str(audiocaps)) == [("r1nicOVtvkQ", 0, "A woman talks nearby"),
                                             ("UDGBjjwyaqE", 0, "Multiple clanging and clanking sounds"),
                                             ("r1nicOVtvkQ", 1, "A woman speaks, then a dog barks")]
    assert read_captions(str(audiocaps), id_col="{youtube_id}_{start_time}")[0][0] == "r1nicOVtvkQ_130"
    clotho = tmp_path / "clotho.csv"   # with a byte-order mark, as spreadsheet programs write
    clotho.write_bytes("file_name,caption_1,caption_2,caption_3,caption_4,caption_5,caption_10\n"
                       "Distorted AM Radio noise.wav,a1,a2,a3,a4,a5,a10\n".encode("utf-8-sig"))
    caps = read_captions(str(clotho))
    assert [c[2] for c in caps] == ["a1", "a2", "a3", "a4", "a5", "a10"]
    assert {c[0] for c in caps} == {"Distorted AM Radio noise"} and [c[1] for c in caps] == list(range(6))
    records = tmp_path / "wavcaps.json"
    records.write_text(json.dumps({"data": [{"id": "x1.flac", "caption": "  a  bird\nsings "}, {"id": "x2", "caption": "rain"}]}))
    assert read_captions(str(records)) == [("x1", 0, "a bird sings"), ("x2", 0, "rain")]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"k1": ["c1", "c2"], "k2": "c3"}))
    assert read_captions(str(mapping)) == [("k1", 0, "c1"), ("k1", 1, "c2"), ("k2", 0, "c3")]


def test_caption_file_errors_name_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "c.csv"
    bad.write_text("name,caption\nx,hello\n")
    with pytest.raises(DataError, match=r"c\.csv: no id column \(file_name, youtube_id.*columns: name, caption\); "
                                        r"name the column of audio file names with --id-col"):
        read_captions(str(bad))
    with pytest.raises(DataError, match=r"c\.csv: no id column 'ytid' \(columns: name, caption\)"):
        read_captions(str(bad), id_col="ytid")
    with pytest.raises(DataError, match=r"no caption column 'text'"):
        read_captions(str(bad), id_col="name", caption_cols=["text"])
    bad.write_text("file_name,label\nx,dog\n")
    with pytest.raises(DataError, match=r"c\.csv: no caption column \(caption, caption_1, \.\.\.; columns: file_name, "
                                        r"label\); name it with --caption-col"):
        read_captions(str(bad))
    bad.write_text("file_name,caption\nx,hello\n,orphan\n")
    with pytest.raises(DataError, match=r"c\.csv: line 3: empty id"):
        read_captions(str(bad))


def test_plan_matches_ids_to_files_and_refuses_captions_without_audio(tmp_path):
    write_wavs(tmp_path / "clips", ["dev/a.wav", "dev/b.flac", "eval/c.wav", "d.wav"])
    caps = tmp_path / "c.csv"
    caps.write_text("file_name,caption_1,caption_2\na.wav,a one,a two\ndev/b,b one,\n")
    plan = make_plan(str(tmp_path / "clips"), str(caps))
    # a file name matches its file in a subfolder; only captioned files are embedded
    assert plan.captions == [("dev/a", 0, "a one"), ("dev/a", 1, "a two"), ("dev/b", 0, "b one")]
    assert [i for i, _ in plan.files] == ["dev/a", "dev/b"] and plan.uncaptioned == 2 and plan.skipped == 0
    caps.write_text("file_name,caption\na.wav,x\nzz1.wav,y\nzz2,z\nzz1.wav,w\n")
    with pytest.raises(DataError, match=r"c\.csv: 2 caption ids have no audio file in .*clips \(e\.g\. 'zz1', 'zz2'\); "
                                        r"add the files, fix --id-col, or pass --skip-missing"):
        make_plan(str(tmp_path / "clips"), str(caps))
    plan = make_plan(str(tmp_path / "clips"), str(caps), skip_missing=True)
    assert plan.captions == [("dev/a", 0, "x")] and plan.skipped == 3
    write_wavs(tmp_path / "clips", ["eval/a.wav"])
    with pytest.raises(DataError, match=r"id 'a' names two files below .*\('dev/a', 'eval/a'\)"):
        make_plan(str(tmp_path / "clips"), str(caps))


def test_captions_resume_refuse_a_changed_file_and_pair_by_id_in_the_loader(tmp_path):
    names = [f"c{k:02d}.wav" for k in range(12)]
    write_wavs(tmp_path / "clips", names)
    rows = "".join(f"{n},{','.join(f'clip {k} caption {j}' for j in range(5))}\n" for k, n in enumerate(names))
    (tmp_path / "caps.csv").write_text("file_name," + ",".join(f"caption_{j}" for j in range(1, 6)) + "\n" + rows)
    plan = make_plan(str(tmp_path / "clips"), str(tmp_path / "caps.csv"))
    enc, text = FakeTextEncoder(), str(tmp_path / "text.npz")
    extract(str(tmp_path / "clips"), str(tmp_path / "audio.npz"), enc, files=plan.files)
    assert extract_captions(plan.captions[:23], text, enc, batch_size=7) == 23
    assert extract_captions(plan.captions, text, enc, batch_size=7) == 37           # resumed: only the rest
    cache = load_cache(text, "fake", text=True)
    assert len(cache["ids"]) == 60 and cache["captions"][0] == "clip 0 caption 0"
    want = enc.embed_text(cache["captions"])
    assert np.allclose(np.stack(cache["emb"]), want, atol=1e-6)                   # each row is its own caption's
    ds = embed_cache.load(f"clap:audio={tmp_path / 'audio.npz'},text={text},text_key=emb,val=0.25,test=0.25", "audio-text")
    for split in ds.splits.values():          # every caption pairs with its own clip
        assert all(split.b_ids[k] == split.a_ids[j] for k, j in enumerate(split.b_to_a.tolist()))
        assert len(split.b_ids) == 5 * len(split.a_ids)
    changed = [(i, n, t + " (edited)" if (i, n) == ("c03", 2) else t) for i, n, t in plan.captions]
    with pytest.raises(DataError, match=r"caption 3 of 'c03' is 'clip 3 caption 2 \(edited\)', but .*text\.npz holds "
                                        r"'clip 3 caption 2' for it; use another --text-out"):
        extract_captions(changed, text, enc)
    with pytest.raises(DataError, match=r"audio\.npz: a cache of audio, not of captions; use another --text-out"):
        extract_captions(plan.captions, str(tmp_path / "audio.npz"), enc)


def test_the_printed_spec_drops_unpaired_ids_only_when_the_caches_hold_some(tmp_path):
    write_wavs(tmp_path / "clips", ["a.wav", "b.wav", "c.wav"])
    (tmp_path / "caps.csv").write_text("file_name,caption\na,x\nb,y\n")
    enc = FakeTextEncoder()
    extract(str(tmp_path / "clips"), str(tmp_path / "a.npz"), enc)                 # all three clips, an earlier run
    plan = make_plan(str(tmp_path / "clips"), str(tmp_path / "caps.csv"))
    extract_captions(plan.captions, str(tmp_path / "t.npz"), enc)
    spec, note = data_spec(str(tmp_path / "a.npz"), str(tmp_path / "t.npz"), "fake")
    assert spec.endswith("t.npz,text_key=emb,drop_unpaired=1") and note.startswith("1 audio ids without captions")
    extract(str(tmp_path / "clips"), str(tmp_path / "a2.npz"), enc, files=plan.files)
    assert data_spec(str(tmp_path / "a2.npz"), str(tmp_path / "t.npz"), "fake") == (
        f"clap:audio={tmp_path / 'a2.npz'},text={tmp_path / 't.npz'},text_key=emb", "")


def test_sharded_captions_merge_to_the_one_process_cache(tmp_path):
    names = [f"c{k:02d}.wav" for k in range(10)]
    write_wavs(tmp_path / "clips", names)
    (tmp_path / "caps.csv").write_text("file_name,caption_1,caption_2\n" + "".join(f"{n},{n} a,{n} b\n" for n in names))
    plan, enc = make_plan(str(tmp_path / "clips"), str(tmp_path / "caps.csv")), FakeTextEncoder()
    whole, out = str(tmp_path / "whole.npz"), str(tmp_path / "t.npz")
    extract_captions(plan.captions, whole, enc)
    parts = [part_path(out, (i, 3)) for i in range(3)]
    for i, part in enumerate(parts):
        extract_captions(plan.captions, part, enc, shard=(i, 3))
    sizes = [len(load_cache(p, "fake", text=True)["ids"]) for p in parts]
    assert sum(sizes) == 20 and all(0 < n < 20 for n in sizes)
    assert merge(parts, out, expect={(i, n) for i, n, _ in plan.captions}) == 20
    a, b = load_cache(whole, "fake", text=True), load_cache(out, "fake", text=True)
    assert a["ids"] == b["ids"] and a["caption_no"] == b["caption_no"] and a["captions"] == b["captions"]
    assert np.allclose(np.stack(a["emb"]), np.stack(b["emb"]))
    with pytest.raises(DataError, match=r"1 captions are in no part, e.g. \('zz', 0\)"):
        merge(parts, str(tmp_path / "bad.npz"), expect={(i, n) for i, n, _ in plan.captions} | {("zz", 0)})
    extract(str(tmp_path / "clips"), part_path(str(tmp_path / "a.npz"), (0, 3)), enc, shard=(0, 3))
    with pytest.raises(DataError, match=r"parts of audio and of captions; merge each cache on its own"):
        merge([part_path(str(tmp_path / "a.npz"), (0, 3))] + parts[1:], str(tmp_path / "bad.npz"))
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize("case", ["no id column", "ids without audio", "logmel", "text-out alone"])
def test_command_line_errors_are_one_line_exit_2_and_write_nothing(tmp_path, case, capsys):
    write_wavs(tmp_path / "clips", ["a.wav", "b.wav"])
    caps = tmp_path / "caps.csv"
    caps.write_text({"no id column": "clip,caption\na,x\n"}.get(case, "file_name,caption\na.wav,x\nmissing.wav,y\n"))
    args = ["--audio-dir", str(tmp_path / "clips"), "--out", str(tmp_path / "a.npz"), "--captions", str(caps),
            "--encoder", "logmel" if case == "logmel" else "hf-clap", "--model", str(tmp_path / "no_such_model")]
    if case == "text-out alone":
        args = args[:4] + ["--text-out", str(tmp_path / "t.npz")]
    assert main(args) == 2
    err = capsys.readouterr().err
    expected = {"no id column": r"caps\.csv: no id column \(.*\); name the column of audio file names with --id-col",
                "ids without audio": r"caps\.csv: 1 caption ids have no audio file in .*clips \(e\.g\. 'missing'\)",
                "logmel": r"--encoder logmel embeds audio only; captions need --encoder hf-clap or laion-clap",
                "text-out alone": r"--text-out needs --captions FILE"}[case]
    assert len(err.strip().splitlines()) == 1 and re.search("^error: .*" + expected, err), err
    assert sorted(os.listdir(tmp_path)) == ["caps.csv", "clips"]


def test_help_lists_the_encoders():
    out = subprocess.run([sys.executable, "-m", "embed_cache.extract", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert all(name in out for name in ("logmel", "hf-clap", "laion-clap", "--captions", "--skip-missing"))
