"""embed_cache loaders: every layout they read, stable splits, and one clear line per bad input."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import diffgap_eval as ev
import embed_cache
import train
from embed_cache import DataError, Rows
from embed_cache import arrays as arrays_mod

D = 8


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rand(n, d=D, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def all_rows(ds, side):
    """Every (unit) row of one side over the three splits, with the audio row of each B row."""
    return torch.cat([getattr(s, side)[:] for s in ds.splits.values()])


def assert_paired(ds, b_rows, a_of_b):
    """Every training/val/test pair (a, b) of ds must be (a_of_b[j], b_rows[j]) for the b row j it holds."""
    b_rows, a_of_b = unit(np.asarray(b_rows, dtype=np.float64)), unit(np.asarray(a_of_b, dtype=np.float64))
    for s in ds.splits.values():
        a, b = (x[:].double().numpy() for x in s.pairs())
        sim = b @ b_rows.T                                   # find each loaded B row in the source
        j = sim.argmax(1)
        assert np.allclose(sim[np.arange(len(b)), j], 1, atol=1e-5)
        assert np.allclose(a, a_of_b[j], atol=1e-5)


def write_csv(path, rows, header):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------

def test_npz_with_captions_per_audio(tmp_path):
    p = str(tmp_path / "pairs.npz")
    a, b = rand(200), rand(1000, seed=1)
    np.savez(p, a=a, b=b, b_to_a=np.repeat(np.arange(200), 5))
    ds = embed_cache.load(p, "audio-text")
    assert ds.spec == p and ds.dims == (D, D)
    assert len(all_rows(ds, "a")) == 200 and len(all_rows(ds, "b")) == 1000
    for split in ds.splits.values():
        assert torch.allclose(split.a.norm(dim=1), torch.ones(len(split.a)), atol=1e-5)
        assert torch.equal(torch.bincount(split.b_to_a, minlength=len(split.a)), torch.full((len(split.a),), 5))
    assert_paired(ds, b, a[np.arange(1000) // 5])


def test_two_npy_files_paired_by_position(tmp_path):
    pa, pb = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    a, b = rand(100, 4), rand(100, 6, seed=1)
    np.save(pa, a), np.save(pb, b)
    ds = embed_cache.load(f"{pa},{pb}", "audio-video")
    assert ds.dims == (4, 6) and len(all_rows(ds, "a")) == 100
    assert_paired(ds, b, a)


def test_npz_per_modality_with_keys_and_ids_in_different_orders(tmp_path):
    ids = [f"clip{i:03d}" for i in range(120)]
    a, b = rand(120), rand(120, seed=1)
    perm = np.random.default_rng(2).permutation(120)
    np.savez(tmp_path / "audio.npz", emb=a, ids=np.array(ids))
    np.savez(tmp_path / "video.npz", feats=b[perm], other=np.zeros(3), ids=np.array(ids)[perm])
    ds = embed_cache.load(f"arrays:a={tmp_path}/audio.npz,b={tmp_path}/video.npz,b_key=feats", "audio-video")
    assert_paired(ds, b, a)
    with pytest.raises(DataError, match=r"video\.npz: holds feats, other; choose one with a_key= / b_key="):
        embed_cache.load(f"arrays:a={tmp_path}/audio.npz,b={tmp_path}/video.npz", "audio-video")


def test_torch_pt_dict(tmp_path):
    p = str(tmp_path / "pairs.pt")
    torch.save({"audio": torch.from_numpy(rand(100)), "text": torch.from_numpy(rand(100, seed=1))}, p)
    ds = embed_cache.load(f"arrays:file={p},a_key=audio,b_key=text", "audio-text")
    assert len(all_rows(ds, "b")) == 100


def test_repeated_rows_with_csv_ids(tmp_path):
    """Real exports repeat the audio row once per caption: merged by id, captions kept."""
    a, captions = rand(60), rand(300, seed=1)
    rows = np.repeat(np.arange(60), 5)
    shuffle = np.random.default_rng(3).permutation(300)          # and not in audio order
    np.save(tmp_path / "audio.npy", a[rows][shuffle])
    np.save(tmp_path / "text.npy", captions[shuffle])
    write_csv(tmp_path / "meta.csv", [[f"yt{r}", f"caption {i}"] for i, r in enumerate(rows[shuffle])],
              ["youtube_id", "caption"])
    spec = f"arrays:a={tmp_path}/audio.npy,b={tmp_path}/text.npy,ids={tmp_path}/meta.csv,id_col=youtube_id"
    ds = embed_cache.load(spec, "audio-text")
    assert len(all_rows(ds, "a")) == 60 and len(all_rows(ds, "b")) == 300
    for s in ds.splits.values():
        assert torch.equal(torch.bincount(s.b_to_a, minlength=len(s.a)), torch.full((len(s.a),), 5))
    assert_paired(ds, captions, a[rows])


def test_json_id_lists_and_split_column(tmp_path):
    a, b = rand(50), rand(50, seed=1)
    np.save(tmp_path / "a.npy", a), np.save(tmp_path / "b.npy", b)
    split = ["train"] * 30 + ["val"] * 10 + ["test"] * 10
    write_csv(tmp_path / "a.csv", [[f"x{i}", split[i]] for i in range(50)], ["id", "split"])
    (tmp_path / "b.json").write_text(json.dumps([f"x{i}" for i in reversed(range(50))]))
    np.save(tmp_path / "b_rev.npy", b[::-1])
    spec = f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b_rev.npy,a_ids={tmp_path}/a.csv,b_ids={tmp_path}/b.json,split_col=split"
    ds = embed_cache.load(spec, "audio-video")
    assert [len(ds.splits[k].a) for k in ("train", "val", "test")] == [30, 10, 10]
    assert np.allclose(ds.splits["test"].a.numpy(), unit(a[40:]), atol=1e-6)
    assert_paired(ds, b, a)


def test_clap_contiguous_captions_and_explicit_mapping(tmp_path):
    a, t = rand(40), rand(200, seed=1)
    np.save(tmp_path / "audio.npy", a), np.save(tmp_path / "text.npy", t)
    ds = embed_cache.load(f"clap:audio={tmp_path}/audio.npy,text={tmp_path}/text.npy", "audio-text")
    assert_paired(ds, t, a[np.arange(200) // 5])
    # the retrieval ground truth is one-to-many: an audio query owns its 5 captions
    q, g, rel = ds.splits["test"].retrieval(1)
    assert rel.shape == (len(g), 2) and (torch.bincount(rel[:, 0], minlength=len(q)) == 5).all()   # (audio, caption) pairs
    # explicit caption -> audio id mapping, 3 + 7 captions per audio, any order
    owner = np.random.default_rng(4).integers(0, 40, size=200)
    write_csv(tmp_path / "audio.csv", [[f"a{i}"] for i in range(40)], ["audio_id"])
    write_csv(tmp_path / "captions.csv", [[f"a{o}"] for o in owner], ["audio_id"])
    spec = (f"clap:audio={tmp_path}/audio.npy,text={tmp_path}/text.npy,audio_ids={tmp_path}/audio.csv,"
            f"text_ids={tmp_path}/captions.csv,drop_unpaired=1")
    ds = embed_cache.load(spec, "audio-text")
    assert_paired(ds, t, a[owner])
    with pytest.raises(DataError, match=r"text\.npy: 210 captions for 40 audio rows is not a whole number"):
        np.save(tmp_path / "text.npy", rand(210))
        embed_cache.load(f"clap:audio={tmp_path}/audio.npy,text={tmp_path}/text.npy", "audio-text")


def write_cavp(root, n_train=40, n_test=10, frames=12, lists=True):
    """Diff-Foley layout: ROOT/{video,audio}/{Train,Test}/<id>.npz with key feat (L, D)."""
    rng = np.random.default_rng(0)
    feats = {}
    for part, n in (("Train", n_train), ("Test", n_test)):
        ids = [f"{part.lower()}_{i}" for i in range(n)]
        if lists:
            (root / f"{part}.txt").write_text("\n".join(ids) + "\n")
        for modality in ("video", "audio"):
            os.makedirs(root / modality / part, exist_ok=True)
            for i in ids:
                x = unit(rng.normal(size=(frames, D))).astype(np.float32)
                np.savez(root / modality / part / f"{i}.npz", feat=x)
                feats[modality, i] = x
    return feats


@pytest.mark.parametrize("how,dim", [("mean", D), ("frames:4", 4 * D), ("seconds:2", 2 * D)])
def test_cavp_layout_and_pooling(tmp_path, how, dim):
    feats = write_cavp(tmp_path)
    spec = f"cavp:video={tmp_path}/video,audio={tmp_path}/audio,lists={tmp_path},pool={how}"
    ds = embed_cache.load(spec, "audio-video")
    assert ds.dims == (dim, dim)
    assert len(ds.splits["test"].a) == 10 and len(ds.splits["train"].a) + len(ds.splits["val"].a) == 40
    x = feats["audio", "test_0"]
    want = {"mean": x.mean(0), "frames:4": x[[0, 4, 7, 11]].reshape(-1), "seconds:2": x[:8].reshape(2, 4, D).mean(1).reshape(-1)}[how]
    assert np.allclose(ds.splits["test"].a[0].numpy(), unit(want), atol=1e-5)
    with pytest.raises(DataError, match=r"audio/Train/train_0\.npz: 12 frames, but pool=seconds:4 needs 16"):
        embed_cache.load(spec.replace(f"pool={how}", "pool=seconds:4"), "audio-video")


def test_cavp_without_lists_and_a_missing_clip(tmp_path):
    write_cavp(tmp_path, lists=False)
    os.remove(tmp_path / "audio" / "Train" / "train_3.npz")
    spec = f"cavp:video={tmp_path}/video,audio={tmp_path}/audio"
    with pytest.raises(DataError, match=r"1 ids in .*video have no row in .*audio \(e\.g\. 'train_3'\); pass drop_unpaired=1"):
        embed_cache.load(spec, "audio-video")
    ds = embed_cache.load(spec + ",drop_unpaired=1", "audio-video")
    assert sum(len(s.a) for s in ds.splits.values()) == 49 and "dropped unpaired ids: 0 audio, 1 other" in ds.summary()


def test_folders_of_per_id_files(tmp_path):
    for m, seed in (("aud", 0), ("vid", 1)):
        os.makedirs(tmp_path / m)
        for i, v in enumerate(rand(60, seed=seed)):
            np.save(tmp_path / m / f"id{i}.npy", v)
    ds = embed_cache.load(f"dirs:a={tmp_path}/aud,b={tmp_path}/vid", "audio-video")
    assert sum(len(s.a) for s in ds.splits.values()) == 60 and ds.dims == (D, D)
    np.save(tmp_path / "vid" / "id7.npy", np.ones(D + 1, dtype=np.float32))
    with pytest.raises(DataError, match=r"vid/id7\.npy: pooled shape \(9,\), but earlier files in .*vid give \(8,\)"):
        embed_cache.load(f"dirs:a={tmp_path}/aud,b={tmp_path}/vid", "audio-video")


def test_unnormalised_input_is_normalised_and_its_norms_reported(tmp_path):
    a, b = 3 * rand(100), rand(100, seed=1)
    np.save(tmp_path / "a.npy", a), np.save(tmp_path / "b.npy", unit(b))
    ds = embed_cache.load(f"{tmp_path}/a.npy,{tmp_path}/b.npy", "audio-video")
    norms = np.linalg.norm(a, axis=1)
    assert f"audio norms {norms.min():.3g}/{norms.mean():.3g}/{norms.max():.3g}" in ds.summary()
    assert "video already unit-norm" in ds.summary()
    assert torch.allclose(all_rows(ds, "a").norm(dim=1), torch.ones(100), atol=1e-5)


def test_large_npy_is_memory_mapped_and_trains_lazily(tmp_path, monkeypatch):
    monkeypatch.setattr(arrays_mod, "LAZY_BYTES", 1000)
    a, b = rand(300), rand(300, seed=1)
    np.save(tmp_path / "a.npy", a), np.save(tmp_path / "b.npy", b)
    ds = embed_cache.load(f"{tmp_path}/a.npy,{tmp_path}/b.npy", "audio-video")
    tr = ds.splits["train"]
    assert isinstance(tr.a, Rows) and isinstance(tr.a.array, np.memmap)
    pa, pb = tr.pairs()
    assert isinstance(pa, Rows) and len(pa) == len(pb) == len(tr.b)
    idx = torch.tensor([3, 0, 5])
    assert torch.allclose(pa[idx], torch.from_numpy(unit(a[pa.index[[3, 0, 5]]])), atol=1e-6)
    import diffgap as dg
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=D, dim_b=D, hidden=16, inner=8, time_dim=8))
    model.fit_stats(tr.a, tr.b)
    assert torch.allclose(model.mean_a, torch.from_numpy(unit(a[tr.a.index]).mean(0)), atol=1e-6)
    stats = list(dg.train_steps(model, pa, pb, dg.make_optimizer(model), 3, batch_size=16))
    assert len(stats) == 3 and all(torch.isfinite(s["loss"]) for s in stats)
    q, g, rel = ds.splits["test"].retrieval(0)
    assert isinstance(q, torch.Tensor) and q.shape[1] == D


def test_hash_splits_are_stable_and_sized():
    def split_of(ids, val=0.1, test=0.1):   # every item alone in its group: the split of its id's hash
        return arrays_mod.split_items(ids, None, np.arange(len(ids)), val, test, "spec")[0]
    ids = [f"clip{i}" for i in range(6000)]
    assert np.array_equal(split_of(ids[:1000]), split_of(ids)[:1000])
    share = np.bincount(split_of(ids, val=0.2, test=0.05), minlength=3) / 6000
    assert np.allclose(share, [0.75, 0.2, 0.05], atol=0.02)


def test_synthetic_spec_options():
    ds = embed_cache.load("synthetic:seed=2,n_train=100,n_val=10,n_test=10", "audio-video")
    assert len(ds.splits["train"].a) == 100 and ds.spec.startswith("synthetic:seed=2")
    with pytest.raises(DataError, match="unknown synthetic option 'bogus'"):
        embed_cache.load("synthetic:bogus=1", "audio-video")


BAD_OPTIONS = [   # (spec, what its one line names); the options are parsed before any file is read
    ("arrays:a=a.npy,b=b.npy,vall=0.2", "unknown arrays option 'vall' (valid: a, a_ids, a_key, b, b_ids, b_key, "
                                        "drop_bad, drop_unpaired, file, id_col, ids, per_a, split_col, test, val)"),
    ("clap:audio=a.npy,text=t.npy,per_a=5", "unknown clap option 'per_a'"),
    ("cavp:video=v,audio=a,test=0.1", "unknown cavp option 'test'"),
    ("arrays:a=a.npy,b=b.npy,val=1.2", "option val: "),
    ("arrays:a=a.npy,b=b.npy,test=nan", "option test: "),
    ("arrays:a=a.npy,b=b.npy,val=0.5,test=0.5", "val + test must be below 1"),
    ("arrays:a=a.npy,b=b.npy,per_a=0", "option per_a: "),
    ("clap:audio=a.npy,text=t.npy,per_audio=x", "option per_audio: "),
    ("arrays:a=a.npy,b=b.npy,drop_bad=maybe", "option drop_bad: "),
    ("dirs:a=x,b=y,fps=two", "option fps: "),
    ("dirs:a=x,b=y,pool=max", "option pool: "),
    ("cavp:video=v,audio=a,pool=frames:0", "option pool: "),
    ("synthetic:n_train=0", "option n_train: "),
    ("synthetic:seed=-1", "option seed: "),
    ("synthetic:noise=-1", "option noise: "),
    ("synthetic:rank=1.5", "option rank: "),
    ("synthetic:preset=strong", "unknown preset 'strong'"),
    ("synthetic:dim=2", "needs dim >= rank + 2"),
]


@pytest.mark.parametrize("spec,named", BAD_OPTIONS, ids=[s for s, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_naming_the_spec_and_the_key(tmp_path, monkeypatch, spec, named):
    monkeypatch.chdir(tmp_path)   # no file of the spec exists: the options are refused first
    with pytest.raises(DataError) as err:
        embed_cache.load(spec, "audio-text" if spec.startswith("clap") else "audio-video")
    assert str(err.value).startswith(f"{spec}: ") and named in str(err.value) and "\n" not in str(err.value)


def test_a_json_file_is_not_a_data_spec(tmp_path):
    """JSON spec files are gone (a spec string does their job): a .json path is refused like any other non-spec."""
    np.save(tmp_path / "a.npy", rand(50)), np.save(tmp_path / "b.npy", rand(50, seed=1))
    spec = tmp_path / "data.json"
    spec.write_text(json.dumps({"format": "arrays", "a": f"{tmp_path}/a.npy", "b": f"{tmp_path}/b.npy"}))
    with pytest.raises(DataError) as err:
        embed_cache.load(str(spec), "audio-video")
    message = str(err.value)
    assert message.startswith(f"{spec}: not a data spec; use one of ") and "\n" not in message
    assert ".json" not in message[len(str(spec)):]   # the hint offers no JSON spec either


# ----------------------------------------------------------------------------------------
# Validation: one line naming the file and the problem, raised before anything is written
# ----------------------------------------------------------------------------------------

def bad_case(tmp_path, case):
    """Write the files for one kind of bad input; return the spec that loads them."""
    a, b = rand(200), rand(200, seed=1)
    pa, pb, pz = f"{tmp_path}/a.npy", f"{tmp_path}/b.npy", f"{tmp_path}/x.npz"
    np.save(pa, a), np.save(pb, b)
    pair = f"{pa},{pb}"
    if case == "missing":
        return f"{tmp_path}/nope.npy,{pb}"
    if case == "no_key":
        np.savez(pz, a=a)
        return pz
    if case == "ints":
        np.save(pa, np.ones((200, D), dtype=np.int64))
    elif case == "strings":
        np.save(pa, np.array([["x"] * D] * 200))
    elif case == "rank":
        np.save(pa, a[:, :, None])
    elif case == "count":
        np.save(pb, b[:150])
    elif case in ("nan", "inf", "zero"):
        a[7, 2], a[9, 0] = {"nan": (np.nan, np.nan), "inf": (np.inf, 1), "zero": (0, 0)}[case]
        if case == "zero":
            a[7], a[9] = 0, 0
        np.save(pa, a)
    elif case == "map_range":
        np.savez(pz, a=a, b=b, b_to_a=np.full(200, 999))
        return pz
    elif case == "corrupt_npz":
        np.savez(pz, a=a, b=b)
        with open(pz, "r+b") as f:
            f.truncate(100)
        return pz
    elif case == "truncated_npy":
        with open(pa, "r+b") as f:
            f.truncate(3000)
    elif case == "tiny":
        np.save(pa, a[:3]), np.save(pb, b[:3])
    elif case in ("one_side_ids", "dup_ids", "id_count"):
        ids = [f"k{i}" for i in range(200)]
        if case == "dup_ids":
            ids[5] = "k4"
        if case == "id_count":
            ids = ids[:190]
        write_csv(f"{tmp_path}/ids.csv", [[i] for i in ids], ["id"])
        # B rows 0..2 name ids no audio has; audio k0..k2 then have no B row
        write_csv(f"{tmp_path}/bids.csv", [[f"k{200 + i}" if i < 3 else f"k{i}"] for i in range(200)], ["id"])
        return f"arrays:a={pa},b={pb},a_ids={tmp_path}/ids.csv,b_ids={tmp_path}/bids.csv"
    elif case == "bad_option":
        return f"arrays:a={pa},b={pb},val=lots"
    return pair


BAD = [
    ("missing", r"nope\.npy: no such file"),
    ("no_key", r"x\.npz: no array 'b' \(found: a\)"),
    ("ints", r"a\.npy: dtype int64 is not floating point"),
    ("strings", r"a\.npy: dtype <U1 is not floating point"),
    ("rank", r"a\.npy: expected shape \(N, D\), got \(200, 8, 1\)"),
    ("count", r"b\.npy: 150 rows but .*a\.npy has 200; pair them with ids, b_to_a or per_a"),
    ("nan", r"a\.npy: 2 bad rows: 7 \(NaN or Inf\), 9 \(NaN or Inf\); fix them or pass drop_bad=1"),
    ("inf", r"a\.npy: 1 bad rows: 7 \(NaN or Inf\)"),
    ("zero", r"a\.npy: 2 bad rows: 7 \(all zeros\), 9 \(all zeros\)"),
    ("map_range", r"x\.npz: b_to_a row 0 points to audio row 999, but there are 200 audio rows"),
    ("corrupt_npz", r"x\.npz: cannot read"),
    ("truncated_npy", r"a\.npy: cannot read"),
    ("tiny", r"the (train|val|test) split is empty \(3 audio items are too few"),
    ("one_side_ids", r"3 ids in .*b\.npy have no row in .*a\.npy \(e\.g\. 'k200', 'k201', 'k202'\); pass drop_unpaired=1"),
    ("dup_ids", r"a\.npy: id 'k4' appears at rows 4 and 5 with different vectors \(1 such ids\)"),
    ("id_count", r"a\.npy: 200 rows but 190 ids"),
    ("bad_option", r"option val: 'lots' is not a number"),
]


@pytest.mark.parametrize("case,pattern", BAD, ids=[c for c, _ in BAD])
def test_bad_input_gets_one_line_and_nothing_is_written(tmp_path, case, pattern):
    spec = bad_case(tmp_path, case)
    with pytest.raises(DataError, match=pattern) as err:
        embed_cache.load(spec, "audio-video")
    assert "\n" not in str(err.value)
    out = tmp_path / "runs"
    with pytest.raises(DataError, match=pattern):
        train.main(["--data", spec, "--out", str(out), "--epochs", "1"])
    assert not out.exists()


def test_drop_options_remove_exactly_the_named_rows(tmp_path):
    spec = bad_case(tmp_path, "nan")
    ds = embed_cache.load(spec + ",drop_bad=1" if spec.startswith("arrays:") else
                          f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,drop_bad=1", "audio-video")
    assert sum(len(s.a) for s in ds.splits.values()) == 198 and "dropped 2 bad audio rows" in ds.summary()
    np.save(tmp_path / "z.npy", np.zeros((200, D), np.float32))
    with pytest.raises(DataError, match=r"z\.npy: 200 bad rows"):   # every row bad: an error, dropped or not
        embed_cache.load(f"arrays:a={tmp_path}/z.npy,b={tmp_path}/b.npy,drop_bad=1", "audio-video")
    spec = bad_case(tmp_path, "one_side_ids")
    ds = embed_cache.load(spec + ",drop_unpaired=1", "audio-video")
    # audio k0..k2 have no B rows, B rows k200..k202 no audio: both dropped, 197 pairs remain
    assert sum(len(s.a) for s in ds.splits.values()) == 197 == sum(len(s.b) for s in ds.splits.values())


def test_checkpoint_dims_must_match_the_data(tmp_path):
    import diffgap as dg
    import diffgap_eval as ev
    import sample
    ckpt = tmp_path / "ckpt.pt"
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=D, dim_b=D, hidden=16, inner=8, time_dim=8))
    ev.save_checkpoint(str(ckpt), model, step=0, pair="audio-video", data="synthetic")
    np.save(tmp_path / "a.npy", rand(100, 6)), np.save(tmp_path / "b.npy", rand(100, 6, seed=1))
    with pytest.raises(ValueError, match=r"a\.npy,.*b\.npy: dims 6/6 do not match the checkpoint's 8/8"):
        sample.main(["--ckpt", str(ckpt), "--data", f"{tmp_path}/a.npy,{tmp_path}/b.npy"])
