"""Every file embed_cache reads fails in one line naming it, and a .pt of numpy arrays loads
without running anything the file holds."""
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import embed_cache
from embed_cache import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16


def rand(n, d=D, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# numpy arrays inside a .pt file (CLAP returns numpy; users torch.save what it returns)
# ----------------------------------------------------------------------------------------

def test_numpy_arrays_in_a_pt_file_load_with_their_values(tmp_path):
    a, b = rand(200), rand(200, seed=1)
    ids = np.array([f"clip{i}" for i in range(200)])
    torch.save({"a": a, "b": b}, tmp_path / "pairs.pt")
    ds = embed_cache.load(str(tmp_path / "pairs.pt"), "audio-text")
    for s in ds.splits.values():   # every loaded pair is a row of the file, normalised
        rows = np.array([int(i) for i in s.a_ids])
        assert np.allclose(s.a.numpy(), a[rows] / np.linalg.norm(a[rows], axis=1, keepdims=True), atol=1e-6)
        assert np.allclose(s.pairs()[1].numpy(), b[rows] / np.linalg.norm(b[rows], axis=1, keepdims=True), atol=1e-6)
    assert sum(len(s.a) for s in ds.splits.values()) == 200
    # ids and a mapping saved as numpy arrays too (string and integer dtypes), beside a tensor
    torch.save({"audio": torch.from_numpy(a), "text": np.repeat(b, 2, 0), "b_to_a": np.repeat(np.arange(200), 2),
                "a_ids": ids}, tmp_path / "mixed.pt")
    ds = embed_cache.load(f"arrays:file={tmp_path}/mixed.pt,a_key=audio,b_key=text", "audio-text")
    assert sorted(i for s in ds.splits.values() for i in s.a_ids) == sorted(ids)
    assert all(len(s.b) == 2 * len(s.a) for s in ds.splits.values())


def test_the_reported_pt_of_numpy_arrays_trains(tmp_path):
    """`torch.save({"a": np_a, "b": np_b}, "pairs.pt")` then train.py --data pairs.pt: a run, not a traceback."""
    torch.save({"a": rand(200), "b": rand(200, seed=1)}, tmp_path / "pairs.pt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "pairs.pt"),
                           "--epochs", "1", "--no-eval", "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert torch.load(tmp_path / "runs" / "audio-video" / "ckpt.pt", weights_only=True)["step"] > 0


class Trap:
    """Unpickling this object calls open(marker, "w"): the file appears if anything runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pickle.dump", "torch.save"])
def test_a_pt_file_with_code_in_it_is_refused_unrun(tmp_path, how):
    marker, path = tmp_path / "ran", tmp_path / "pairs.pt"
    obj = {"a": rand(50), "b": rand(50, seed=1), "meta": Trap(marker)}
    if how == "pickle.dump":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    with pytest.raises(DataError) as err:
        embed_cache.load(str(path), "audio-video")
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and "not read" in message
    assert not marker.exists()
    # the command line: one `error:` line naming the file, exit status 2, nothing run
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(path), "--epochs", "1",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_an_object_array_in_a_pt_file_is_refused(tmp_path):
    torch.save({"a": rand(50), "b": np.array([object()] * 50)}, tmp_path / "x.pt")
    with pytest.raises(DataError, match=r"x\.pt: holds a numpy array of dtype object, which is not read"):
        embed_cache.load(str(tmp_path / "x.pt"), "audio-video")


def test_the_numpy_allowlist_is_lifted_after_each_load(tmp_path):
    torch.save({"a": rand(50), "b": rand(50, seed=1)}, tmp_path / "pairs.pt")
    embed_cache.load(str(tmp_path / "pairs.pt"), "audio-video")
    left = [g for g in torch.serialization.get_safe_globals()   # torch registers some of its own lazily
            if "numpy" in str(getattr(g[0] if isinstance(g, tuple) else g, "__module__", ""))]
    assert left == []
    with pytest.raises(Exception, match="numpy"):   # a plain weights-only load still refuses numpy arrays
        torch.load(tmp_path / "pairs.pt", weights_only=True)


# ----------------------------------------------------------------------------------------
# Every reader x every kind of broken file: one DataError line naming the file
# ----------------------------------------------------------------------------------------

N = 60


def write_valid(tmp_path, reader):
    """Write a loadable dataset whose `reader` file is the one to break; return (spec, that file)."""
    a, b = rand(N), rand(N, seed=1)
    np.save(tmp_path / "a.npy", a), np.save(tmp_path / "b.npy", b)
    pair = f"{tmp_path}/a.npy,{tmp_path}/b.npy"
    ids = [f"clip_{i:04d}" for i in range(N)]
    if reader == "npy":
        return pair, tmp_path / "a.npy"
    if reader == "npz":
        np.savez(tmp_path / "x.npz", a=a, b=b)
        return str(tmp_path / "x.npz"), tmp_path / "x.npz"
    if reader == "pt":
        torch.save({"a": a, "b": torch.from_numpy(b)}, tmp_path / "x.pt")
        return str(tmp_path / "x.pt"), tmp_path / "x.pt"
    if reader in ("csv", "txt", "json"):
        path = tmp_path / f"ids.{reader}"
        path.write_text({"csv": "id,split\n" + "".join(f"{i},train\n" for i in ids), "txt": "\n".join(ids) + "\n",
                         "json": json.dumps(ids)}[reader])
        return f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,ids={path}", path
    if reader in ("clip_npy", "clip_npz"):
        for m, x in (("aud", a), ("vid", b)):
            os.makedirs(tmp_path / m)
            for i, v in zip(ids, x):
                np.save(tmp_path / m / f"{i}.npy", v) if reader == "clip_npy" else np.savez(tmp_path / m / f"{i}.npz", feat=v[None])
        return f"dirs:a={tmp_path}/aud,b={tmp_path}/vid", tmp_path / "aud" / f"clip_0007.{reader[-3:]}"
    if reader == "cavp_list":
        for part, part_ids in (("Train", ids[:40]), ("Test", ids[40:])):
            (tmp_path / f"{part}.txt").write_text("\n".join(part_ids) + "\n")
            for m, x in (("audio", a), ("video", b)):
                os.makedirs(tmp_path / m / part)
                for i in part_ids:
                    np.savez(tmp_path / m / part / f"{i}.npz", feat=np.stack([x[ids.index(i)]] * 4))
        return f"cavp:video={tmp_path}/video,audio={tmp_path}/audio,lists={tmp_path}", tmp_path / "Train.txt"
    raise AssertionError(reader)


def break_file(path, fault):
    data = path.read_bytes()
    if fault == "empty":
        path.write_bytes(b"")
    elif fault == "truncated":   # cut inside a record, as a full disk or a killed copy leaves it
        path.write_bytes(data[:len(data) // 2 + 3])
    elif fault == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size=len(data), dtype=np.uint8).tobytes())
    elif fault == "wrong_type":  # a well-formed file of another kind: text where bytes are due, and bytes for text
        if path.suffix in (".csv", ".txt", ".json"):
            buf = io.BytesIO()
            np.save(buf, np.zeros(3))
            path.write_bytes(buf.getvalue())
        elif path.suffix == ".pt":
            torch.save(torch.zeros(3), path)
        elif path.suffix == ".npz":
            np.savez(path, other=np.zeros(3))
        else:
            path.write_text("a,b\n1,2\n")


READERS = ["npy", "npz", "pt", "csv", "txt", "json", "clip_npy", "clip_npz", "cavp_list"]
FAULTS = ["empty", "truncated", "garbage", "wrong_type"]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("reader", READERS)
def test_a_broken_file_is_one_line_naming_it(tmp_path, reader, fault):
    spec, path = write_valid(tmp_path, reader)
    pair = "audio-video"
    embed_cache.load(spec, pair)   # loads before the fault
    break_file(path, fault)
    with pytest.raises(DataError) as err:
        embed_cache.load(spec, pair)
    message = str(err.value)
    assert "\n" not in message, message
    assert path.name in message, message


BAD_JSON = [   # (file, content): ids lists of the wrong shape
    ("ids.json", "5"), ("ids.json", '{"id": 5}'), ("ids.json", "[[1, 2]]"), ("ids.json", '[{"id": "a"}, {"x": "b"}]'),
    ("ids.json", '{"id": ["a"], "split": ["train", "val"]}'), ("ids.json", "[]"), ("ids.csv", "id,split\nx1\n"),
    ("ids.csv", "id,id\nx1,x2\n"), ("ids.csv", "id\n\n \n"), ("ids.txt", "\n\n"),
]


@pytest.mark.parametrize("name,content", BAD_JSON)
def test_a_list_of_the_wrong_shape_is_one_line_naming_it(tmp_path, name, content):
    np.save(tmp_path / "a.npy", rand(N)), np.save(tmp_path / "b.npy", rand(N, seed=1))
    (tmp_path / name).write_text(content)
    spec = f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,ids={tmp_path / name}"
    with pytest.raises(DataError) as err:
        embed_cache.load(spec, "audio-video")
    assert "\n" not in str(err.value) and name in str(err.value), str(err.value)
    assert "DataError" not in str(err.value), str(err.value)   # the reader's own line, not wrapped in "cannot read"


def test_an_empty_id_is_named_by_its_row(tmp_path):
    np.save(tmp_path / "a.npy", rand(N)), np.save(tmp_path / "b.npy", rand(N, seed=1))
    (tmp_path / "ids.csv").write_text("id\n" + "".join('""\n' if i == 2 else f"k{i}\n" for i in range(N)))
    with pytest.raises(DataError, match=r"ids\.csv: row 3 has an empty id in column 'id' \(1 such rows\)"):
        embed_cache.load(f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,ids={tmp_path}/ids.csv", "audio-video")
