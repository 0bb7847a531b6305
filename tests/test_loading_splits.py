"""One clip, one split: whatever the layout, no clip id and no identical row sits in two splits,
and a split's features come from that split's own files."""
import os

import numpy as np
import pytest
import torch

import diffgap_eval as ev
import embed_cache
from embed_cache import DataError

D = 16


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rand(n, d=D, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def assert_one_split_per_clip(ds):
    """No id and no identical (rounded) row of either side is in two splits."""
    seen = {}
    for name, s in ds.splits.items():
        keys = {("id", i) for i in s.a_ids}
        for side in ("a", "b"):
            keys |= {(side, r.tobytes()) for r in np.round(getattr(s, side)[:].numpy(), 5)}
        for k in keys:
            assert seen.setdefault(k, name) == name, f"{k[0]} {k[1]!r:.40} is in {seen[k]} and {name}"


def clap_captions(n_audio=200, per=5, seed=0):
    """Synthetic-like CLAP embeddings: unit audio rows, each caption its audio plus a little noise."""
    rng = np.random.default_rng(seed)
    audio = unit(rng.normal(size=(n_audio, D)))
    text = np.repeat(audio, per, 0) + 0.15 * rng.normal(size=(n_audio * per, D)) / np.sqrt(D)
    return audio.astype(np.float32), text.astype(np.float32)


def text_to_audio_r1(split):
    q, g, rel = split.retrieval(0)
    return ev.retrieval_metrics(ev.cosine_scores(q, g), rel)["R@1"]


def test_clap_audio_repeated_once_per_caption_is_one_clip_in_one_split(tmp_path):
    """The reported layout: 200 clips x 5 captions with the audio row repeated per caption
    (np.repeat(audio, 5, 0) beside 1,000 caption rows) loads as 200 clips, never split apart."""
    audio, text = clap_captions()
    np.save(tmp_path / "audio.npy", audio), np.save(tmp_path / "text.npy", text)
    np.save(tmp_path / "audio_rep.npy", np.repeat(audio, 5, 0))
    one_row = embed_cache.load(f"clap:audio={tmp_path}/audio.npy,text={tmp_path}/text.npy", "audio-text")
    repeated = embed_cache.load(f"clap:audio={tmp_path}/audio_rep.npy,text={tmp_path}/text.npy", "audio-text")
    for ds in (one_row, repeated):
        assert sum(len(s.a) for s in ds.splits.values()) == 200 and sum(len(s.b) for s in ds.splits.values()) == 1000
        assert_one_split_per_clip(ds)
        for s in ds.splits.values():   # each clip owns its 5 captions
            assert torch.equal(torch.bincount(s.b_to_a, minlength=len(s.a)), torch.full((len(s.a),), 5))
        assert text_to_audio_r1(ds.splits["test"]) == 1.0
    assert "merged 800 repeated audio rows" in repeated.notes


def test_per_a_and_b_to_a_layouts_with_repeated_audio_rows_merge_them(tmp_path):
    audio, text = clap_captions(100, 3)
    np.save(tmp_path / "a.npy", np.repeat(audio, 3, 0)), np.save(tmp_path / "t.npy", np.repeat(text, 2, 0))
    ds = embed_cache.load(f"arrays:a={tmp_path}/a.npy,b={tmp_path}/t.npy,per_a=2", "audio-text")
    assert sum(len(s.a) for s in ds.splits.values()) == 100
    assert_one_split_per_clip(ds)
    np.savez(tmp_path / "p.npz", a=np.repeat(audio, 3, 0), b=text, b_to_a=np.arange(300))
    ds = embed_cache.load(str(tmp_path / "p.npz"), "audio-text")
    assert sum(len(s.a) for s in ds.splits.values()) == 100
    assert_one_split_per_clip(ds)


def test_identical_rows_under_different_ids_stay_in_one_split(tmp_path):
    """A clip listed twice under two ids (or a video row shared by two clips) is kept in one split."""
    a, b = rand(300), rand(300, seed=1)
    a[150:] = a[:150]                      # ids 150.. repeat the audio of ids 0..
    b[np.arange(0, 300, 7)] = b[3]         # and every 7th video row is one and the same
    ids = np.array([f"v{i}" for i in range(300)])
    np.savez(tmp_path / "p.npz", a=a, b=b, a_ids=ids, b_ids=ids)
    ds = embed_cache.load(str(tmp_path / "p.npz"), "audio-video")
    assert sum(len(s.a) for s in ds.splits.values()) == 300   # different ids: kept, not merged
    assert_one_split_per_clip(ds)
    assert "300 audio items share an identical row with another item" in ds.notes


def test_unlinked_items_keep_their_hash_split(tmp_path):
    a, b = rand(400), rand(400, seed=1)
    a[10] = a[20]
    np.save(tmp_path / "a.npy", a), np.save(tmp_path / "b.npy", b)
    ds = embed_cache.load(f"{tmp_path}/a.npy,{tmp_path}/b.npy", "audio-video")
    where = {i: k for k, s in enumerate(ds.splits.values()) for i in s.a_ids}
    want = embed_cache.arrays.split_items([str(i) for i in range(400)], None, np.arange(400), 0.1, 0.1, "spec")[0]
    assert all(where[str(i)] == want[i] for i in range(400) if i != 20)   # row 20 merged into row 10
    assert "20" not in where


def test_a_repeated_id_given_two_splits_is_refused(tmp_path):
    a = rand(100)
    np.save(tmp_path / "a.npy", np.repeat(a, 2, 0)), np.save(tmp_path / "b.npy", rand(200, seed=1))
    split = ["train", "train"] * 100
    split[7] = "test"                      # clip k3's second caption row is marked test
    (tmp_path / "meta.csv").write_text("id,split\n" + "".join(f"k{i // 2},{s}\n" for i, s in enumerate(split)))
    spec = f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,ids={tmp_path}/meta.csv,split_col=split"
    with pytest.raises(DataError, match=r"a\.npy: id 'k3' is in split 'train' at row 6 and 'test' at row 7 "
                                        r"\(1 such ids\); a clip belongs to one split"):
        embed_cache.load(spec, "audio-video")


def test_dirs_with_one_id_twice_are_refused(tmp_path):
    for m, seed in (("aud", 0), ("vid", 1)):
        os.makedirs(tmp_path / m)
        for i, v in enumerate(rand(30, seed=seed)):
            np.save(tmp_path / m / f"id{i}.npy", v)
    np.savez(tmp_path / "vid" / "id4.npz", feat=rand(1, seed=9))
    with pytest.raises(DataError, match=r"vid: id 'id4' has two files \(id4\.npy, id4\.npz\); keep one"):
        embed_cache.load(f"dirs:a={tmp_path}/aud,b={tmp_path}/vid", "audio-video")


def write_cavp(root, ids_train, ids_test, lists=True, seed=0):
    rng = np.random.default_rng(seed)
    feats = {}
    for part, ids in (("Train", ids_train), ("Test", ids_test)):
        if lists:
            (root / f"{part}.txt").write_text("\n".join(ids) + "\n")
        for modality in ("video", "audio"):
            os.makedirs(root / modality / part, exist_ok=True)
            for i in ids:
                feats[modality, part, i] = unit(rng.normal(size=(8, D))).astype(np.float32)
                np.savez(root / modality / part / f"{i}.npz", feat=feats[modality, part, i])
    return feats


def test_cavp_test_features_come_from_the_test_files(tmp_path):
    feats = write_cavp(tmp_path, [f"c{i}" for i in range(40)], [f"c{i}" for i in range(40, 50)])
    ds = embed_cache.load(f"cavp:video={tmp_path}/video,audio={tmp_path}/audio,lists={tmp_path}", "audio-video")
    test = ds.splits["test"]
    assert sorted(test.a_ids) == sorted(f"c{i}" for i in range(40, 50))
    for row, i in enumerate(test.a_ids):
        assert np.allclose(test.a[row].numpy(), unit(feats["audio", "Test", i].mean(0)), atol=1e-6)
    assert_one_split_per_clip(ds)


def test_cavp_id_in_both_lists_is_refused(tmp_path):
    write_cavp(tmp_path, [f"c{i}" for i in range(40)], ["c3"] + [f"c{i}" for i in range(40, 50)])
    with pytest.raises(DataError, match=r"Train\.txt and Test\.txt both list 1 ids \(e\.g\. 'c3'\); a clip belongs "
                                        r"to one split"):
        embed_cache.load(f"cavp:video={tmp_path}/video,audio={tmp_path}/audio,lists={tmp_path}", "audio-video")


def test_cavp_clip_with_files_in_train_and_test_is_refused(tmp_path):
    write_cavp(tmp_path, [f"c{i}" for i in range(40)], ["c3"] + [f"c{i}" for i in range(40, 50)], lists=False)
    with pytest.raises(DataError, match=r"clip 'c3' has files in both Train/ and Test/; a clip belongs to one split"):
        embed_cache.load(f"cavp:video={tmp_path}/video,audio={tmp_path}/audio", "audio-video")


def test_cavp_audio_and_video_from_different_parts_is_refused(tmp_path):
    write_cavp(tmp_path, [f"c{i}" for i in range(40)], [f"c{i}" for i in range(40, 50)], lists=False)
    os.replace(tmp_path / "video" / "Train" / "c5.npz", tmp_path / "video" / "Test" / "c5.npz")
    with pytest.raises(DataError, match=r"clip 'c5': audio under .*audio/Train, video under .*video/Test; a clip's "
                                        r"features come from one split's files"):
        embed_cache.load(f"cavp:video={tmp_path}/video,audio={tmp_path}/audio", "audio-video")


def test_cavp_train_clip_equal_to_a_test_clip_moves_to_test(tmp_path):
    """A Train clip whose features equal a Test clip's (one video under two ids) joins it in test."""
    write_cavp(tmp_path, [f"c{i}" for i in range(40)], [f"c{i}" for i in range(40, 50)])
    for m in ("audio", "video"):
        np.savez(tmp_path / m / "Test" / "c41.npz", feat=np.load(tmp_path / m / "Train" / "c7.npz")["feat"])
    ds = embed_cache.load(f"cavp:video={tmp_path}/video,audio={tmp_path}/audio,lists={tmp_path}", "audio-video")
    assert {"c7", "c41"} <= set(ds.splits["test"].a_ids)
    assert_one_split_per_clip(ds)
