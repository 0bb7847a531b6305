"""train.py and sample.py end to end, through their command lines, on tiny synthetic data."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import diffgap as dg
import diffgap_eval as ev
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "synthetic:n_train=256,n_val=20,n_test=40"


def run(script, *args, cwd, check=True):
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    out = run("train.py", "--pair", "audio-video", "--data", TINY, "--epochs", "2", "--switch-every", "3",
              "--num-samples", "2", cwd=cwd)
    return cwd, out


def test_train_writes_checkpoint_and_prints_table(trained):
    cwd, out = trained
    ckpt = torch.load(cwd / "runs" / "audio-video" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 8 and "optimizer" in ckpt and ckpt["config"]["switch_every"] == 3
    assert ckpt["run"] == dict(pair="audio-video", data=TINY, epochs=2, batch_size=64, lr=1e-3, seed=0, direction="both",
                              encoder=None)   # synthetic: no embedding model
    assert "parameters" in out.stdout
    for row in ("B->A      contrastive", "B->A      diffgap", "A->B      contrastive", "A->B      diffgap"):
        assert row in out.stdout


def test_resume_continues_from_the_saved_step(trained, tmp_path):
    cwd, _ = trained
    run("train.py", "--pair", "audio-video", "--out", str(tmp_path), "--data", TINY, "--epochs", "1",
        "--switch-every", "3", "--num-samples", "1", cwd=cwd)
    run("train.py", "--pair", "audio-video", "--out", str(tmp_path), "--resume", "--epochs", "3", "--num-samples", "1", cwd=cwd)
    ckpt = torch.load(tmp_path / "audio-video" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 12 and ckpt["config"]["switch_every"] == 3


def test_sample_finds_the_checkpoint_and_reports_both_directions(trained, tmp_path):
    cwd = tmp_path
    shutil.copytree(trained[0] / "runs", cwd / "runs")
    out = run("sample.py", "--steps", "5", "--num-samples", "2", cwd=cwd).stdout
    for row in ("B->A      diffgap", "B->A      blend-0.5", "B->A      two-way-blend-0.25", "A->B      contrastive",
                "A->B      oracle"):
        assert row in out
    assert "FD" in out and "95% CI" in out and "R@1 gain over contrastive" in out and "val R@1" in out
    # the ranking samples are guided (the default), the generated embeddings are not
    assert "K=2 samples averaged, guidance 16 (8 for two-way galleries);" in out and "one sample per query, guidance 1)" in out
    assert "test split translated in" in out and "val split translated in" in out   # val: for --score auto's choice
    chosen = [line for line in out.splitlines() if line.startswith(("B->A", "A->B")) and " * " in line + " "]
    assert len(chosen) == 2 and "--score auto, chosen on the validation split:\n  B->A " in out
    assert "beyond noise" in out     # each choice says why it was made
    again = run("sample.py", "--steps", "5", "--num-samples", "2", cwd=cwd).stdout
    table = lambda text: text[text.index("test retrieval"):text.index("generation quality")]
    assert table(again) == table(out)      # seeded: the same table every run
    assert os.listdir(cwd / "runs" / "audio-video") == ["ckpt.pt"]     # evaluation writes nothing


def test_a_model_without_condition_dropout_ranks_unguided(trained, tmp_path):
    cwd, _ = trained
    out = run("train.py", "--pair", "audio-video", "--out", str(tmp_path), "--data", TINY, "--epochs", "1",
              "--p-uncond", "0", "--num-samples", "1", cwd=cwd).stdout
    assert "samples averaged, guidance 1;" in out
    out = run("sample.py", "--ckpt", str(tmp_path / "audio-video" / "ckpt.pt"), "--num-samples", "1", cwd=cwd).stdout
    assert "K=1 samples averaged, guidance 1;" in out


def test_sample_generates_for_given_conditions(trained):
    cwd, _ = trained
    cond = np.random.default_rng(0).normal(size=(7, 512)).astype(np.float32)
    np.save(cwd / "cond.npy", cond)
    run("sample.py", "--direction", "b2a", "--cond", "cond.npy", "--out", "gen.npy", "--num-samples", "2", cwd=cwd)
    gen = np.load(cwd / "gen.npy")
    assert gen.shape == (7, 512) and np.allclose(np.linalg.norm(gen, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("direction", ["b2a", "a2b"])
def test_cond_writes_the_seeded_mean_of_samples_in_the_asked_direction(direction, tmp_path, monkeypatch):
    """Unequal dims (A 12, B 20): --cond FILE writes normalize(sample_many(...).mean(0)) with the
    generator seeded by --seed, for the direction asked, with every sampling option passed on."""
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=12, dim_b=20, hidden=32, inner=16, depth=1, time_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)        # EMA and net, directions and guidance all matter
    model.fit_stats(torch.randn(50, 12) + 1, torch.randn(50, 20) - 1)
    ev.save_checkpoint(str(tmp_path / "ckpt.pt"), model, step=0, pair="audio-video", data="synthetic")
    d = {"b2a": 0, "a2b": 1}[direction]
    cond = torch.randn(5, 20 if d == 0 else 12)
    np.save(tmp_path / "cond.npy", cond.numpy())
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--ckpt", "ckpt.pt", "--direction", direction, "--cond", "cond.npy", "--out", "gen.npy",
                        "--num-samples", "3", "--steps", "4", "--sampler", "ddpm", "--guidance", "2",
                        "--seed", "5"]) == 0
    gen = torch.from_numpy(np.load(tmp_path / "gen.npy"))
    loaded, _ = ev.load_checkpoint(str(tmp_path / "ckpt.pt"))
    many = loaded.eval().sample_many(cond, d, 3, steps=4, sampler="ddpm", guidance=2.0,
                                     generator=torch.Generator().manual_seed(5))      # (3, 5, D_target)
    assert gen.shape == (5, 12 if d == 0 else 20)
    assert torch.allclose(gen, torch.nn.functional.normalize(many.mean(0), dim=-1), atol=1e-6)
    assert not torch.allclose(gen, torch.nn.functional.normalize(many[0], dim=-1), atol=1e-3)   # a mean, not one


@pytest.mark.parametrize("case", ["wrong_dim", "nan"])
def test_bad_condition_file_writes_nothing(trained, case):
    cwd, _ = trained
    cond = np.random.default_rng(0).normal(size=(4, 100 if case == "wrong_dim" else 512)).astype(np.float32)
    if case == "nan":
        cond[2, 5] = np.nan
    np.save(cwd / f"{case}.npy", cond)
    res = run("sample.py", "--direction", "b2a", "--cond", f"{case}.npy", "--out", f"{case}_out.npy", cwd=cwd, check=False)
    assert res.returncode == 2
    msg = res.stderr.strip()
    assert msg.count("\n") == 0 and f"{case}.npy" in msg
    assert ("dim 100" in msg) if case == "wrong_dim" else ("1 bad rows: 2 (NaN or Inf)" in msg)
    assert not (cwd / f"{case}_out.npy").exists()


def test_sample_without_checkpoint_says_train_first(tmp_path):
    res = run("sample.py", "--steps", "5", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "train.py" in res.stderr and res.stderr.strip().count("\n") == 0


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    res = run("sample.py", "--ckpt", "bad.pt", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "bad.pt" in res.stderr and "checkpoint" in res.stderr


def test_bad_data_stops_training_before_anything_is_written(tmp_path):
    res = run("train.py", "--data", "missing.npz", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "missing.npz: no such file" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_audio_text_end_to_end(tmp_path):
    run("train.py", "--pair", "audio-text", "--data", TINY, "--epochs", "1", "--num-samples", "1", cwd=tmp_path)
    out = run("sample.py", "--steps", "5", "--num-samples", "1", cwd=tmp_path).stdout
    assert "audio-text" in out and "A->B      diffgap" in out


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_before_exiting(tmp_path, sig, code):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", TINY, "--epochs", "100000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "runs" / "audio-video" / "ckpt.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code and "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(";")[0])
    assert torch.load(ckpt, weights_only=True)["step"] == step
