"""The plain .npz / .npy loader: pairing, stable splits and one clear line per bad input."""
import numpy as np
import pytest
import torch

import embed_cache
from embed_cache import DataError
from embed_cache.arrays import split_of


def write_npz(path, n_a=200, d=8, k=1, **override):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(n_a, d)).astype(np.float32),
              "b": rng.normal(size=(n_a * k, d)).astype(np.float32)}
    if k > 1:
        arrays["b_to_a"] = np.repeat(np.arange(n_a), k)
    arrays.update(override)
    np.savez(path, **{key: v for key, v in arrays.items() if v is not None})
    return arrays


def test_npz_with_captions_per_audio(tmp_path):
    p = str(tmp_path / "pairs.npz")
    arrays = write_npz(p, k=5)
    ds = embed_cache.load(p, "audio-text")
    assert ds.spec == p and ds.dims == (8, 8)
    total_a = sum(len(s.a) for s in ds.splits.values())
    total_b = sum(len(s.b) for s in ds.splits.values())
    assert total_a == 200 and total_b == 1000
    for split in ds.splits.values():
        assert torch.allclose(split.a.norm(dim=1), torch.ones(len(split.a)), atol=1e-5)
        assert torch.equal(torch.bincount(split.b_to_a, minlength=len(split.a)), torch.full((len(split.a),), 5))
    # rows stay paired: the first test caption is the normalised b row of its audio
    test = ds.splits["test"]
    rows = (split_of(torch.arange(200)) == 2).nonzero().flatten()
    b0 = arrays["b"][rows[0] * 5]
    assert np.allclose(test.b[0].numpy(), b0 / np.linalg.norm(b0), atol=1e-6)


def test_two_npy_files(tmp_path):
    rng = np.random.default_rng(1)
    pa, pb = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(pa, rng.normal(size=(100, 4)))
    np.save(pb, rng.normal(size=(100, 6)))
    ds = embed_cache.load(f"{pa},{pb}", "audio-video")
    assert ds.dims == (4, 6)
    assert sum(len(s.a) for s in ds.splits.values()) == 100


def test_splits_are_stable_when_rows_are_added():
    assert torch.equal(split_of(torch.arange(1000)), split_of(torch.arange(5000))[:1000])
    share = torch.bincount(split_of(torch.arange(10000)), minlength=3).float() / 10000
    assert torch.allclose(share, torch.tensor([0.8, 0.1, 0.1]), atol=0.02)


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"nope\.npz: no such file"),
    ("no_key", r"no array 'b' \(found: a\)"),
    ("nan", r"\['a'\]: row 7 has NaN or Inf values \(1 such rows\)"),
    ("zero", r"\['b'\]: row 3 is all zeros"),
    ("rank", r"\['a'\]: expected shape \(N, D\)"),
    ("ints", r"\['a'\]: dtype int64 is not floating point"),
    ("count", r"'a' has 200 rows and 'b' 150; add 'b_to_a'"),
    ("map_range", r"\['b_to_a'\]: row 0 points to audio row 999"),
    ("corrupt", r"cannot read"),
    ("tiny", r"split is empty"),
])
def test_bad_inputs_get_one_clear_line(tmp_path, case, pattern):
    p = str(tmp_path / ("nope.npz" if case == "missing" else "x.npz"))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8)).astype(np.float32)
    if case == "no_key":
        np.savez(p, a=a)
    elif case == "nan":
        a[7, 2] = np.nan
        write_npz(p, a=a)
    elif case == "zero":
        b = rng.normal(size=(200, 8)).astype(np.float32)
        b[3] = 0
        write_npz(p, b=b)
    elif case == "rank":
        write_npz(p, a=a[:, :, None])
    elif case == "ints":
        write_npz(p, a=np.ones((200, 8), dtype=np.int64))
    elif case == "count":
        write_npz(p, b=a[:150])
    elif case == "map_range":
        write_npz(p, b_to_a=np.full(200, 999))
    elif case == "corrupt":
        write_npz(p)
        with open(p, "r+b") as f:
            f.truncate(100)
    elif case == "tiny":
        write_npz(p, n_a=3)
    with pytest.raises(DataError, match=pattern) as err:
        embed_cache.load(p, "audio-video")
    assert "\n" not in str(err.value)


def test_synthetic_spec_options():
    ds = embed_cache.load("synthetic:seed=2,n_train=100,n_val=10,n_test=10", "audio-video")
    assert len(ds.splits["train"].a) == 100 and ds.spec.startswith("synthetic:seed=2")
    with pytest.raises(DataError, match="unknown synthetic option 'bogus'"):
        embed_cache.load("synthetic:bogus=1", "audio-video")
