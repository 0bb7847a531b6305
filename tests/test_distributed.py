"""More than one process: torchrun training equals one process; sharded extraction merges."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from embed_cache import DataError
from embed_cache.extract import LogMelEncoder, extract, load_cache, merge, part_path
from test_extract import write_clips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--pair", "audio-video", "--data", "synthetic:n_train=512,n_val=20,n_test=20", "--epochs", "6",
        "--switch-every", "8", "--no-eval"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def train(launcher, out, *extra, **kw):
    return subprocess.run(launcher + [os.path.join(ROOT, "train.py"), *ARGS, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, **kw)


def weights(out):
    return torch.load(os.path.join(out, "audio-video", "ckpt.pt"), weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in one process and in two (48 steps, 6 direction phases)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    for launcher, out in (([sys.executable], one), (TORCHRUN, two)):
        res = train(launcher, out)
        assert res.returncode == 0, res.stderr[-3000:]
    return one, two


def test_two_processes_train_the_same_model_as_one(runs):
    one, two = runs
    a, b = weights(one), weights(two)
    assert a["step"] == b["step"] == 48
    gap = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    assert 0 <= gap < 1e-4                      # the same up to floating-point reduction order
    assert os.listdir(os.path.join(two, "audio-video")) == ["ckpt.pt"]   # rank 0 alone writes


# train.py, except that rank 0 stops for good right after writing the checkpoint of step 16 (an
# epoch end): the test kills the run there, whatever the machine's speed
HANG_AFTER_STEP_16 = """
import runpy, sys, time
sys.path.insert(0, {root!r})
import diffgap_eval as ev
save = ev.save_checkpoint
def save_then_hang(path, model, **extra):
    save(path, model, **extra)
    if extra.get("step") == 16:
        time.sleep(600)
ev.save_checkpoint = save_then_hang
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def kill_processes_running(path: str) -> None:
    """SIGKILL every process whose command line holds path (Linux's /proc; elsewhere nothing)."""
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if path.encode() in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:   # gone meanwhile, or not ours
            pass


def test_two_process_run_killed_with_sigkill_and_resumed_ends_identical(runs, tmp_path):
    _, two = runs
    script = tmp_path / "train_hang.py"
    script.write_text(HANG_AFTER_STEP_16.format(root=ROOT, train=os.path.join(ROOT, "train.py")))
    proc = subprocess.Popen(TORCHRUN + [str(script), *ARGS, "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "audio-video" / "ckpt.pt"
    step = lambda: torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None   # written atomically
    deadline = time.time() + 240
    try:
        while step() != 16 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)        # torchrun, no handler runs
        proc.wait()
        kill_processes_running(str(script))        # the workers: torchrun starts each in its own session
    assert step() == 16                            # killed mid-run: rank 1 was already in step 17
    res = train(TORCHRUN, tmp_path, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = weights(two), weights(tmp_path)
    assert b["step"] == 48
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sharded_extraction_merged_equals_one_process(tmp_path):
    write_clips(tmp_path / "wav", n=30)
    enc = LogMelEncoder()
    whole = str(tmp_path / "whole.npz")
    extract(str(tmp_path / "wav"), whole, enc, batch_size=4)
    out = str(tmp_path / "cache.npz")
    parts = [part_path(out, (i, 3)) for i in range(3)]
    for i, part in enumerate(parts):
        extract(str(tmp_path / "wav"), part, enc, batch_size=4, shard=(i, 3))
    sizes = [len(load_cache(p, enc.name)["ids"]) for p in parts]
    assert sum(sizes) == 30 and all(0 < n < 30 for n in sizes)
    assert merge(parts, out, str(tmp_path / "wav")) == 30
    one, merged = load_cache(whole, enc.name), load_cache(out, enc.name)
    # same ids, same vectors up to float32 rounding: the shards' batches group other clips together
    assert one["ids"] == merged["ids"] and np.allclose(np.stack(one["emb"]), np.stack(merged["emb"]), rtol=1e-5, atol=1e-6)

    with pytest.raises(DataError, match=r"shard 1/3 is missing"):
        merge([parts[0], parts[2]], str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match=r"shard 0/3 is also in"):
        merge([parts[0], parts[0], parts[1], parts[2]], str(tmp_path / "bad.npz"))
    shutil.copy(tmp_path / "wav" / "part0" / "clip000.flac", tmp_path / "wav" / "zz_new.flac")
    with pytest.raises(DataError, match=r"1 files are in no part, e.g. zz_new"):
        merge(parts, str(tmp_path / "bad.npz"), str(tmp_path / "wav"))
    assert not (tmp_path / "bad.npz").exists()


def test_extract_command_line_shards_and_merges(tmp_path):
    write_clips(tmp_path / "wav", n=12)
    run = lambda *a: subprocess.run([sys.executable, "-m", "embed_cache.extract", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=300)
    out = str(tmp_path / "c.npz")
    for i in range(2):
        res = run("--audio-dir", str(tmp_path / "wav"), "--out", out, "--shard", f"{i}/2")
        assert res.returncode == 0, res.stderr
    res = run("--merge", part_path(out, (0, 2)), part_path(out, (1, 2)), "--out", out)
    assert res.returncode == 0 and "12 embeddings from 2 parts" in res.stdout
    bad = run("--audio-dir", str(tmp_path / "wav"), "--out", out, "--shard", "2/2")
    assert bad.returncode == 2 and "--shard 2/2: use I/N with 0 <= I < N" in bad.stderr
