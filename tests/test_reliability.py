"""What survives a crash: exact resume, durable writes, and every bad option refused."""
import os
import stat
import subprocess
import sys

import pytest
import torch

import diffgap as dg
import diffgap_eval as ev
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "synthetic:n_train=256,n_val=20,n_test=40"


def small_model():
    torch.manual_seed(0)
    return dg.DiffGAP(dg.DiffGAPConfig(dim_a=16, dim_b=16, hidden=32, inner=16, depth=1, time_dim=16,
                                       switch_every=4, ema_decay=0.9))


def run(model, opt, a, b, steps, start):
    for _ in dg.train_steps(model, a, b, opt, steps, batch_size=8, start_step=start, seed=3):
        pass


@pytest.mark.parametrize("stop_at", [3, 5, 11])   # mid-epoch, at an epoch end (45 // 8 = 5), after a switch
def test_resume_at_any_step_is_bit_identical(tmp_path, stop_at):
    """45 pairs, batch 8: not a multiple of the batch, 20 steps across 4 epochs and 5 direction phases."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(45, 16, generator=g), torch.randn(45, 16, generator=g)
    straight = small_model()
    opt = dg.make_optimizer(straight)
    run(straight, opt, a, b, 20, 0)

    first = small_model()
    opt1 = dg.make_optimizer(first)
    run(first, opt1, a, b, stop_at, 0)
    torch.randn(1000)   # the global RNG state does not matter to training
    path = str(tmp_path / "ckpt.pt")
    ev.save_checkpoint(path, first, optimizer=opt1.state_dict(), step=stop_at)
    resumed, ckpt = ev.load_checkpoint(path)
    opt2 = dg.make_optimizer(resumed)
    opt2.load_state_dict(ckpt["optimizer"])
    run(resumed, opt2, a, b, 20 - stop_at, ckpt["step"])

    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and any(k.startswith("ema.") for k in want)
    assert all(torch.equal(want[k], got[k]) for k in want)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_an_epoch_is_a_permutation_of_whole_batches():
    """train_steps visits epoch_order(N, e) batch by batch; the N % B rows left over wait for another epoch."""
    n, bs = 45, 8
    assert dg.steps_per_epoch(n, bs) == 5
    a = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 16) + 1     # row i holds i + 1 (never a zero row)
    model, seen = small_model(), []

    def loss(target, *rest):
        seen.append(target[:, 0].long() - 1)
        return model(target, *rest)
    for _ in dg.train_steps(model, a, a.clone(), dg.make_optimizer(model), 6, bs, net=loss):
        pass
    epoch0 = torch.cat(seen[:5])
    assert len(epoch0) == 40 and len(set(epoch0.tolist())) == 40           # no pair twice in an epoch
    assert torch.equal(epoch0, dg.epoch_order(n, 0)[:40])
    assert torch.equal(seen[5], dg.epoch_order(n, 1)[:8])                   # the next epoch's first batch
    assert not torch.equal(dg.epoch_order(n, 0, seed=0), dg.epoch_order(n, 1, seed=0))
    assert not torch.equal(dg.epoch_order(n, 0, seed=0), dg.epoch_order(n, 0, seed=1))
    with pytest.raises(ValueError, match="batch size 46 must be between 1 and the number of training pairs"):
        dg.steps_per_epoch(n, 46)


def test_checkpoint_write_leaves_no_temp_file_and_keeps_the_old_one_on_failure(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    ev.atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        ev.atomic_write(path, broken)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoint_write_syncs_the_data_then_renames_then_syncs_the_folder(tmp_path, monkeypatch):
    """A power loss at any point keeps the old file or the whole new one: the data reaches the disk
    before the rename (else the rename can land first: an empty file), the folder after it."""
    path = str(tmp_path / "ckpt.pt")
    ev.atomic_write(path, lambda f: f.write(b"old"))
    events, fsync, replace = [], os.fsync, os.replace

    def record_fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            events.append(("fsync folder", os.path.samestat(info, os.stat(tmp_path))))
        else:   # what the file holds now: the file in the folder with this inode, whatever its name
            name = next(n for n in os.listdir(tmp_path) if os.stat(tmp_path / n).st_ino == info.st_ino)
            events.append(("fsync file", (tmp_path / name).read_bytes(), info.st_ino))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, dst))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    ev.atomic_write(path, lambda f: f.write(b"new data"))
    assert [e[0] for e in events] == ["fsync file", "replace", "fsync folder"]
    assert events[0][1] == b"new data"                  # flushed before the fsync: all of it
    assert events[1][1] == events[0][2] and events[1][2] == path   # the synced file is the one renamed
    assert events[2][1] is True                         # the folder holding path
    assert open(path, "rb").read() == b"new data"


def test_crash_drill_one_trial_is_identical():
    """~20 s: SIGKILL after the first checkpoint, resume, compare with a clean run."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "crash_drill.py"), "--trials", "1",
                          "--data", "synthetic:n_train=600,n_val=20,n_test=20", "--epochs", "6",
                          "--switch-every", "7", "--after-first-save", "--seed", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "identical: 1/1" in res.stdout, res.stdout + res.stderr[-2000:]
    # seed 1 draws the kill at 13% of the training after the first save: a run that finished
    # first would have tested no resume
    assert "killed after" in res.stdout and "finished before its kill" not in res.stdout, res.stdout


def cli(main, argv, tmp_path, monkeypatch, capsys):
    """Run a command in tmp_path as the user would; returns (exit status, stderr)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        ev.run_cli(lambda: main(argv))
    return exit_.value.code, capsys.readouterr().err


BAD_TRAIN = [
    (["--batch-size", "0"], "argument --batch-size: must be finite, >= 1; got 0"),
    (["--batch-size", "abc"], "argument --batch-size: 'abc' is not an integer"),
    (["--switch-every", "0"], "argument --switch-every: must be finite, >= 1"),
    (["--epochs", "0"], "argument --epochs: must be finite, >= 1"),
    (["--p-uncond", "1.5"], "argument --p-uncond: must be finite, >= 0 and < 1; got 1.5"),
    (["--p-uncond", "1"], "argument --p-uncond: must be finite, >= 0 and < 1"),
    (["--ema-decay", "1"], "argument --ema-decay: must be finite, >= 0 and < 1"),
    (["--lr", "0"], "argument --lr: must be finite, > 0"),
    (["--lr", "nan"], "argument --lr: must be finite, > 0; got nan"),
    (["--num-samples", "0"], "argument --num-samples: must be finite, >= 1"),
    (["--rank-guidance", "inf"], "argument --rank-guidance: must be finite; got inf"),
    (["--save-every-min", "0"], "argument --save-every-min: must be finite, > 0"),
    (["--seed", "-1"], "argument --seed: must be finite, >= 0"),
    (["--objective", "x1"], "argument --objective: invalid choice: 'x1'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--data", "arrays:a=a.npy,b=b.npy,bogus=1"], "unknown arrays option 'bogus' (valid: a, a_ids, a_key, b,"),
    (["--data", "arrays:a=a.npy,b=b.npy,vall=0.2"], "unknown arrays option 'vall'"),
    (["--data", "clap:audio=a.npy,text=t.npy,per_a=5"], "unknown clap option 'per_a'"),
    (["--data", "cavp:video=v,audio=a,test=0.1"], "unknown cavp option 'test'"),
    (["--data", "synthetic:n_train=100,vall=0.2"], "unknown synthetic option 'vall'"),
    (["--data", "synthetic:n_train=0"], "option n_train: must be finite, >= 1"),
    (["--data", "synthetic:noise=-1"], "option noise: must be finite, >= 0"),
    (["--data", "synthetic:preset=strong"], "unknown preset 'strong' (use default, aligned, multimodal)"),
    (["--data", "synthetic:dim=2"], "needs dim >= rank + 2 and nuisance_rank <= dim (got dim=2, rank=64"),
    (["--data", "synthetic:rank=600"], "needs dim >= rank + 2"),
    (["--data", "arrays:a=a.npy,b=b.npy,val=1.2"], "option val: must be finite, >= 0 and < 1"),
    (["--data", "arrays:a=a.npy,b=b.npy,val=0.5,test=0.5"], "val + test must be below 1"),
    (["--data", "arrays:a=a.npy,b=b.npy,per_a=0"], "option per_a: must be finite, >= 1"),
    (["--data", "arrays:a=a.npy,b=b.npy,drop_bad=maybe"], "option drop_bad: must be 0 or 1"),
    (["--data", "dirs:a=x,b=y,fps=two"], "option fps: 'two' is not an integer"),
    (["--data", TINY, "--batch-size", "5000"], "batch size 5000 must be between 1 and the number of training pairs (256)"),
    (["--resume"], "runs/audio-video/ckpt.pt: no such checkpoint"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "cuda"),
]


@pytest.mark.parametrize("argv, message", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_option_is_one_line_and_writes_nothing(argv, message, tmp_path, monkeypatch, capsys):
    code, err = cli(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err
    assert os.listdir(tmp_path) == []


BAD_SAMPLE = [
    (["--steps", "0"], "argument --steps: must be finite, >= 1"),
    (["--num-samples", "0"], "argument --num-samples: must be finite, >= 1"),
    (["--score", "blend-1.5"], "argument --score: unknown score 'blend-1.5'"),
    (["--guidance", "nan"], "argument --guidance: must be finite"),
    (["--eta", "-1"], "argument --eta: must be finite, >= 0"),
    (["--split", "dev"], "argument --split: invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD_SAMPLE, ids=[" ".join(a) for a, _ in BAD_SAMPLE])
def test_bad_sample_option_is_one_line(argv, message, tmp_path, monkeypatch, capsys):
    code, err = cli(sample.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err


def test_resume_refuses_a_different_run_setting(tmp_path, monkeypatch, capsys):
    argv = ["--data", TINY, "--epochs", "1", "--no-eval", "--batch-size", "32"]
    assert cli(train.main, argv, tmp_path, monkeypatch, capsys)[0] == 0
    before = (tmp_path / "runs" / "audio-video" / "ckpt.pt").read_bytes()
    code, err = cli(train.main, ["--resume", "--batch-size", "64"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "--batch-size 64 differs from the checkpoint's 32" in err
    assert (tmp_path / "runs" / "audio-video" / "ckpt.pt").read_bytes() == before
    # the same settings, given or not, are fine; --epochs may grow
    assert cli(train.main, ["--resume", "--batch-size", "32", "--epochs", "2", "--no-eval"], tmp_path, monkeypatch,
               capsys)[0] == 0
    assert torch.load(tmp_path / "runs" / "audio-video" / "ckpt.pt", weights_only=True)["step"] == 16
