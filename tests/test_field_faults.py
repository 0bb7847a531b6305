"""Faults from the field, second round, each with its small input and the right value: two writers of one
file, a folder that cannot be fsynced, statistics of one row, byte-order marks, two files with one id, long
recordings, empty inputs, offsets past 2^31, query-count memory, huge medians, a resumed loss log, the
progress bar's redraws and class-labelled sets whose text rows repeat."""
import errno
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

import diffgap as dg
import diffgap_eval as ev
import embed_cache
import kernels
import train
from embed_cache import DataError
from embed_cache.base import atomic_write
from embed_cache.extract import LogMelEncoder, find_audio, main as extract_main, read_audio
from test_score_choice import TINY, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# 1, 2: writers ---------------------------------------------------------------------------------
def test_two_writers_of_one_file_each_land_whole_or_not_at_all(tmp_path):
    """A second write of the same path while the first is half-way (two processes, one cache): each has its
    own temp file, the last rename wins whole, no temp is left, and the mode is what open() gives."""
    path = str(tmp_path / "cache.npz")

    def outer(f):
        f.write(b"first half of A, ")
        atomic_write(path, lambda g: g.write(b"all of B"))
        f.write(b"second half of A")
    atomic_write(path, outer)
    assert open(path, "rb").read() == b"first half of A, second half of A"
    assert os.listdir(tmp_path) == ["cache.npz"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def refuse_fsync(monkeypatch, code: int, of_folders: bool):
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) == of_folders:
            raise OSError(code, os.strerror(code))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EBADF])
def test_a_folder_that_cannot_be_fsynced_is_skipped_by_every_writer(tmp_path, monkeypatch, code):
    refuse_fsync(monkeypatch, code, of_folders=True)
    atomic_write(str(tmp_path / "x.bin"), lambda f: f.write(b"x"))
    assert train.main(["--data", TINY, "--epochs", "2", "--no-eval", "--out", str(tmp_path / "runs"),
                       "--loss-log", str(tmp_path / "loss.log")]) == 0
    model, ckpt = ev.load_checkpoint(str(tmp_path / "runs" / "audio-video" / "ckpt.pt"))
    assert ckpt["step"] == 8


def test_a_data_file_that_cannot_be_fsynced_fails_naming_it_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    atomic_write(path, lambda f: f.write(b"old"))
    refuse_fsync(monkeypatch, errno.EIO, of_folders=False)
    with pytest.raises(OSError, match=f"{path}: cannot be written durably"):
        atomic_write(path, lambda f: f.write(b"new"))
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


# 3: statistics of too few rows -----------------------------------------------------------------
def test_the_frechet_distance_of_one_row_is_one_line():
    with pytest.raises(ValueError, match="needs at least 2 rows in each set, got 1 and 3"):
        ev.frechet_distance(torch.randn(1, 4), torch.randn(3, 4))
    assert ev.frechet_distance(torch.eye(2, 4), torch.eye(2, 4)) == pytest.approx(0, abs=1e-9)


def write_arrays(tmp_path, n=30, test=("c0",), classes=None):
    """Audio and text rows paired by id, a split column putting `test` in the test split; classes: each
    clip's text row is its class prompt (identical rows)."""
    g = np.random.default_rng(0)
    a = g.normal(size=(n, 8)).astype(np.float32)
    prompts = g.normal(size=(classes or n, 8)).astype(np.float32)
    label = np.arange(n) % (classes or n)
    b = prompts[label] if classes else a + 0.3 * g.normal(size=a.shape).astype(np.float32)
    np.save(tmp_path / "a.npy", a), np.save(tmp_path / "b.npy", b)
    ids = [f"c{i}" for i in range(n)]
    split = ["test" if i in test else "val" if k % 7 == 1 else "train" for k, i in enumerate(ids)]
    with open(tmp_path / "meta.csv", "w") as f:
        f.write("id,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, split)))
    return a, prompts, label, f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,ids={tmp_path}/meta.csv,split_col=split"


def test_sample_on_a_one_clip_test_split_prints_the_tables_and_na(tmp_path):
    _, _, _, spec = write_arrays(tmp_path)
    run("train.py", "--data", spec, "--epochs", "1", "--batch-size", "8", "--no-eval", cwd=tmp_path)
    res = run("sample.py", "--num-samples", "2", cwd=tmp_path, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-800:]
    assert "test retrieval" in res.stdout
    quality = res.stdout.split("paired cos\n")[1].splitlines()[:2]
    assert all(line.split()[1:3] == ["n/a", "n/a"] for line in quality), quality


def test_run_cli_makes_a_runtime_error_one_line(capsys):
    def main():
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge\nmore")
    with pytest.raises(SystemExit) as e:
        ev.run_cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: _LinAlgError: linalg.eigh: The algorithm failed to converge\n"


# 4: byte-order marks and other encodings -------------------------------------------------------
def test_every_text_reader_accepts_a_utf8_bom_and_names_utf16(tmp_path):
    a = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a), np.save(tmp_path / "b.npy", a + 0.1)
    ids = [f"y{i}" for i in range(60)]
    files = {"ids.csv": "ytid\n" + "".join(f"{i}\n" for i in ids), "ids.txt": "".join(f"{i}\n" for i in ids),
             "ids.json": "[" + ", ".join(f'"{i}"' for i in ids) + "]"}
    for name, text in files.items():
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        col = ",id_col=ytid" if name.endswith(".csv") else ""
        ds = embed_cache.load(f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,ids={tmp_path}/{name}{col}", "audio-video")
        assert sorted(i for s in ds.splits.values() for i in s.a_ids) == sorted(ids), name
        (tmp_path / name).write_bytes(text.encode("utf-16"))
        with pytest.raises(DataError, match=f"{tmp_path}/{name}: the text is UTF-16 .*save it as UTF-8"):
            embed_cache.load(f"arrays:a={tmp_path}/a.npy,b={tmp_path}/b.npy,ids={tmp_path}/{name}{col}", "audio-video")
    from embed_cache.extract import read_captions
    (tmp_path / "ids.txt").write_bytes("y0\ny1\n".encode("utf-16-be"))   # no byte-order mark: its NUL bytes tell
    with pytest.raises(DataError, match="ids.txt: the text is UTF-16"):
        embed_cache.arrays.read_ids(str(tmp_path / "ids.txt"))
    (tmp_path / "cap.csv").write_bytes("file_name,caption\nx,a dog\n".encode("utf-16"))
    with pytest.raises(DataError, match="cap.csv: the text is UTF-16"):
        read_captions(str(tmp_path / "cap.csv"))
    (tmp_path / "cap.csv").write_bytes(b"file_name,caption\nx,caf\xe9\n")   # Latin-1
    with pytest.raises(DataError, match=r"cap.csv: not UTF-8 text \(byte 23: b'\\xe9'\); save it as UTF-8"):
        read_captions(str(tmp_path / "cap.csv"))


# 5, 6: audio files ------------------------------------------------------------------------------
def test_two_files_with_one_id_are_refused_at_extraction_naming_both(tmp_path, capsys):
    os.makedirs(tmp_path / "clips")
    for name in ("cat.wav", "dog.wav", "dog.flac"):
        sf.write(tmp_path / "clips" / name, np.zeros(1600, np.float32), 16000)
    with pytest.raises(DataError, match=r"clips: id 'dog' \(a path without its extension\) has two files \(.*dog.flac, .*dog.wav\)"):
        find_audio(str(tmp_path / "clips"))
    assert extract_main(["--audio-dir", str(tmp_path / "clips"), "--out", str(tmp_path / "audio.npz")]) == 2
    assert "id 'dog' (a path without its extension) has two files" in capsys.readouterr().err and not os.path.exists(tmp_path / "audio.npz")


def test_a_long_recording_reads_only_its_first_window(tmp_path, monkeypatch):
    """60 s at 44.1 kHz and a file of just the frames the 5 s window needs: the same embedding, and only
    those frames are read."""
    enc, sr = LogMelEncoder(), 44100
    x = np.random.default_rng(2).normal(size=(60 * sr, 2)).astype(np.float32) * 0.1
    need = int(np.ceil(enc.clip_seconds * sr))
    sf.write(tmp_path / "long.wav", x, sr, subtype="FLOAT")
    sf.write(tmp_path / "first.wav", x[:need], sr, subtype="FLOAT")
    window = int(enc.sample_rate * enc.clip_seconds)
    frames, real = [], sf.read
    monkeypatch.setattr(sf, "read", lambda *a, **k: frames.append(k.get("frames")) or real(*a, **k))
    clips = [read_audio(str(tmp_path / f), enc.sample_rate, window) for f in ("long.wav", "first.wav")]
    assert frames == [need, need] and len(clips[0]) == window
    assert np.array_equal(clips[0], clips[1])
    assert np.array_equal(*enc.embed_audio(clips))


# 7, 8: kernels and empty inputs ----------------------------------------------------------------
def test_empty_inputs_give_empty_outputs_and_never_turn_a_kernel_off():
    kernels._verdicts.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, i = kernels.topk.cosine_topk_triton(torch.zeros(0, 8), torch.randn(5, 8), 3)
        assert v.shape == i.shape == (0, 3)
        v, i = kernels.cosine_topk(torch.zeros(0, 8), torch.randn(5, 8), 3, backend="triton", strict=True)
        assert v.shape == (0, 3)
        y = kernels.fused_linear_temb_silu(torch.zeros(0, 8), torch.randn(4, 8), torch.randn(4), torch.zeros(0, 4),
                                           strict=True)
        assert y.shape == (0, 4)
    assert all(why is None for why in kernels._verdicts.values())
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=6, hidden=16, inner=8, time_dim=8)).eval()
    assert model.translate(torch.zeros(0, 6), 0, 4).shape == (0, 8)
    assert model.sample_many(torch.zeros(0, 8), 1, 3, guidance=2.0).shape == (3, 0, 6)
    for q, g in ((torch.zeros(0, 4), torch.randn(3, 4)), (torch.randn(3, 4), torch.zeros(0, 4))):
        with pytest.raises(ValueError, match="nothing to rank"):
            ev.retrieval_metrics_from_embeddings(q, g, torch.zeros(len(q), dtype=torch.long))


def test_sample_cond_with_a_zero_row_file_is_one_line(tmp_path):
    run("train.py", "--data", TINY, "--epochs", "1", "--no-eval", cwd=tmp_path)
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), np.float32))
    res = run("sample.py", "--direction", "b2a", "--cond", "empty.npy", "--out", "o.npy", cwd=tmp_path, check=False)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "empty array" in res.stderr
    assert not os.path.exists(tmp_path / "o.npy")


PAST_2_31 = r'''
import os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch
import kernels
from kernels import fused_mlp, topk, unit_stride
D, n = 64, 2**31 + 256
path = os.path.join(tempfile.mkdtemp(), "sparse.bin")
with open(path, "wb") as f:
    f.truncate(4 * n)   # a sparse file: only the pages of the 3 rows below are ever written
big = torch.from_file(path, shared=True, size=n, dtype=torch.float32)
view = big.as_strided((3, D), (2**30 + D, 1))   # row 2 starts past element 2^31
assert unit_stride(view) is view   # the kernels read the rows where they are, no copy
g = torch.Generator().manual_seed(0)
rows, other = torch.randn(3, D, generator=g), torch.randn(5, D, generator=g)
view.copy_(rows)
for q, gal, ref_q, ref_g in ((other, view, other, rows), (view, other, rows, other)):
    v, i = topk.cosine_topk_triton(q, gal, 2)
    rv, ri = kernels.cosine_topk_reference(ref_q, ref_g, 2)
    assert torch.equal(i, ri) and (v - rv).abs().max() < 1e-5, (i, ri)
w, b, t = torch.randn(16, D, generator=g), torch.randn(16, generator=g), torch.randn(3, 16, generator=g)
y = fused_mlp.FusedLinearTembSiLU.apply(view, w, b, t, None, False)
assert (y - kernels.fused_linear_temb_silu_reference(rows, w, b, t)).abs().max() < 1e-5
print("ok")
'''


def test_kernel_offsets_past_2_31_are_int64(tmp_path):
    """Under the interpreter, rows of a strided view 2^30 + 64 elements apart (the last past 2^31, in a
    sparse file: nothing near 8 GB is allocated) as queries, gallery and the fused step's input. In a
    subprocess: an int32 offset crashes the process (rc 139)."""
    res = subprocess.run([sys.executable, "-c", PAST_2_31, ROOT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-1500:])


# 9, 10: memory bounded by chunks, a median of any size -----------------------------------------
def test_query_chunks_and_pair_relevance_give_the_metrics_of_one_block():
    g = torch.Generator().manual_seed(3)
    q, gal = torch.randn(60, 6, generator=g), torch.randn(45, 6, generator=g)
    mask = torch.rand(60, 45, generator=g) < 0.03
    mask[torch.arange(60), torch.randint(0, 45, (60,), generator=g)] = True
    dense = ev.retrieval_metrics(ev.cosine_scores(q, gal), mask)
    pairs = mask.nonzero()[torch.randperm(int(mask.sum()), generator=g)]   # any order, the split's form
    for query_chunk, chunk in ((4096, 8192), (7, 5), (1, 3)):
        got = ev.retrieval_metrics_from_embeddings(q, gal, pairs, query_chunk=query_chunk, chunk=chunk)
        assert got == pytest.approx(dense, abs=1e-6), (query_chunk, chunk)
    assert ev.paired_cosine(q, gal, pairs) == pytest.approx(ev.paired_cosine(q, gal, mask), abs=1e-6)
    split = embed_cache.Split(a=gal[:9], b=q, b_to_a=torch.arange(60) % 9)
    _, _, rel = split.retrieval(1)
    assert rel.shape == (60, 2)   # (audio, item) pairs: no (N_a, N_b) mask


def test_the_bootstrap_in_blocks_is_the_bootstrap_at_once():
    v = (torch.rand(3000, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    assert ev.bootstrap_interval(v, budget=3000 * 7) == ev.bootstrap_interval(v, budget=1 << 30)


def test_the_median_rank_works_past_2_24_values_with_numpy_s_convention():
    first = torch.randint(1, 50, (2**24 + 2,), generator=torch.Generator().manual_seed(0))
    assert ev._median(first) == np.median(first.numpy())
    assert ev._median(torch.tensor([1, 1, 2, 3])) == 1.5 and ev._median(torch.tensor([4, 1, 2])) == 2


# 11, 12: the loss log and the progress bar -----------------------------------------------------
def test_a_resumed_loss_log_has_each_step_once(tmp_path):
    log = tmp_path / "loss.log"
    args = ["--data", TINY, "--no-eval", "--out", str(tmp_path / "r"), "--loss-log", str(log)]
    assert train.main(args + ["--epochs", "1"]) == 0   # checkpoint at step 4
    with open(log, "a") as f:   # what a run killed after step 6 had written past its checkpoint, a torn line last
        f.write("5 0.5\n6 0.4\n7 0.")
    assert train.main(args + ["--resume", "--epochs", "2"]) == 0
    steps = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert steps == list(range(1, 9))
    straight = tmp_path / "straight.log"
    assert train.main(["--data", TINY, "--no-eval", "--out", str(tmp_path / "s"), "--loss-log", str(straight),
                       "--epochs", "2"]) == 0
    assert log.read_text() == straight.read_text()


def test_the_progress_bar_postfix_waits_for_the_next_redraw(tmp_path, monkeypatch):
    calls = []
    real = train.tqdm.set_postfix
    monkeypatch.setattr(train.tqdm, "set_postfix", lambda self, *a, **k: calls.append(k.get("refresh", True)) or
                        real(self, *a, **k))
    assert train.main(["--data", TINY, "--epochs", "5", "--no-eval", "--out", str(tmp_path)]) == 0
    assert calls and not any(calls)


# 13: many clips, one caption -------------------------------------------------------------------
def test_identical_text_rows_are_one_item_and_retrieval_is_zero_shot_classification(tmp_path):
    """5 classes x 12 clips, each text row its class prompt: audio->text ranks the 5 prompts (R@1 is the
    zero-shot accuracy), text->audio counts every clip of the prompt correct, and the notes say so."""
    a, prompts, label, spec = write_arrays(tmp_path, n=60, test=[f"c{i}" for i in range(0, 60, 3)], classes=5)
    ds = embed_cache.load(spec, "audio-text")
    assert "merged 45 text rows into an identical earlier row of their split: retrieval ranks the 15 distinct" in ds.notes
    test = ds.splits["test"]
    q, gal, rel = test.retrieval(1)
    assert gal.shape[0] == 5 and len(test.b) == 20
    clip_class = torch.tensor([int(i[1:]) % 5 for i in test.a_ids])
    item_class = torch.tensor([int(test.b_ids[r][1:]) % 5 for r in test.b_rows()])
    want = (item_class[ev.cosine_scores(q, gal).argmax(1)] == clip_class).float().mean().item()   # zero-shot accuracy
    assert ev.retrieval_metrics_from_embeddings(q, gal, rel)["R@1"] == pytest.approx(want)
    q, gal, rel = test.retrieval(0)
    assert q.shape[0] == 5 and rel.shape == (20, 2)
    hit = (clip_class[ev.cosine_scores(q, gal).argmax(1)] == item_class).float().mean().item()
    assert ev.retrieval_metrics_from_embeddings(q, gal, rel)["R@1"] == pytest.approx(hit)
    train_a, train_b = ds.splits["train"].pairs()
    assert len(train_a) == len(train_b) == len(ds.splits["train"].a)   # training keeps every (clip, prompt) pair
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, time_dim=8)).eval()
    out = ev.translate_split(model, test, 2)
    assert out["b2a"].shape == (5, 8) and ev.split_scores(test, 0, out, ["contrastive", "diffgap"])


def test_a_class_labelled_set_without_a_split_column_says_why_a_split_is_empty(tmp_path):
    """Every clip of a class shares its prompt row, so a class is one group, kept in one split: with 5 classes
    the hash split leaves one split empty, and the message names the groups and split_col=, not the count."""
    *_, spec = write_arrays(tmp_path, n=60, classes=5)
    with pytest.raises(DataError, match="they form 5 groups of identical rows, each kept in one split: a class "
                                        "prompt per clip needs split_col="):
        embed_cache.load(spec.split(",split_col")[0], "audio-text")
