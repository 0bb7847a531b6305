"""Crash drill: kill training with SIGKILL at random moments, resume it, compare with a clean run.

    python tests/crash_drill.py --trials 10                      # synthetic:n_train=2000, 30 epochs
    python tests/crash_drill.py --trials 10 --data synthetic --epochs 2 --switch-every 200

First one uninterrupted `train.py` run (the reference) is timed. Each trial then starts the same
command in a fresh folder, kills it with SIGKILL after a random time in (0, reference time)
(or after the first checkpoint appears, with --after-first-save), and reruns the command with
--resume (from scratch if no checkpoint was written yet), killing again up to --kills times,
until a run finishes. The final checkpoint must equal the reference's bit for bit: step,
weights, EMA weights, embedding statistics and every optimizer state tensor. Checkpoints are
written every --save-every-min minutes (default 0.005, i.e. ~0.3 s), so kills land between
checkpoints, mid-epoch and across direction switches, not only at epoch ends.

Prints one line per trial and `identical: I/N`; exits 1 unless every trial is identical. A tool
beside the tests (pytest does not collect it): tests/test_reliability.py runs one trial.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(args, out: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--pair", args.pair, "--data", args.data,
            "--epochs", str(args.epochs), "--switch-every", str(args.switch_every), "--batch-size",
            str(args.batch_size), "--save-every-min", str(args.save_every_min), "--no-eval", "--out", out]


def ckpt_path(args, out: str) -> str:
    return os.path.join(out, args.pair, "ckpt.pt")


def run_to_end(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")


def differences(a, b, where: str = "") -> list[str]:
    """Paths at which two checkpoint objects (dicts, lists, tensors, plain values) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys differ"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}/{i}")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            gap = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("nan")
            return [f"{where}: max |diff| {gap:.3g}"]
        return []
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(path_a: str, path_b: str) -> list[str]:
    """What decides the future of training: step, model (weights, EMA, stats), optimizer."""
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (path_a, path_b))
    return [d for key in ("step", "model", "optimizer") for d in differences(a[key], b[key], key)]


def trial(args, ref_ckpt: str, window: float, rng: random.Random, folder: str) -> tuple[bool, str]:
    cmd, path = train_cmd(args, folder), ckpt_path(args, folder)
    events = []
    for _ in range(args.kills):
        proc = subprocess.Popen(cmd + (["--resume"] if os.path.exists(path) else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.monotonic()
        if args.after_first_save:
            while not os.path.exists(path) and proc.poll() is None:
                time.sleep(0.01)
        delay = rng.uniform(0, window)
        try:
            proc.wait(timeout=delay)
            events.append(f"finished before its kill ({delay:.1f} s)")
            break
        except subprocess.TimeoutExpired:
            proc.kill()          # SIGKILL: no handler runs, no checkpoint is saved on the way out
            proc.wait()
        step = torch.load(path, weights_only=True)["step"] if os.path.exists(path) else None
        events.append(f"killed after {time.monotonic() - start:.1f} s, last checkpoint at step {step}")
    if not os.path.exists(path) or torch.load(path, weights_only=True)["step"] < torch.load(ref_ckpt, weights_only=True)["step"]:
        run_to_end(cmd + (["--resume"] if os.path.exists(path) else []))
    diffs = compare(ref_ckpt, path)
    return not diffs, "; ".join(events) + (f" -> DIFFERENT: {', '.join(diffs[:3])}" if diffs else " -> identical")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--kills", type=int, default=1, help="SIGKILLs per trial before it may finish")
    p.add_argument("--pair", default="audio-video")
    p.add_argument("--data", default="synthetic:n_train=2000,n_val=200,n_test=200")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--switch-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--save-every-min", type=float, default=0.005)
    p.add_argument("--after-first-save", action="store_true", help="draw the kill time from the first checkpoint on")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="crash_drill_") as tmp:
        ref = os.path.join(tmp, "reference")
        ref_ckpt = ckpt_path(args, ref)
        t0, first_save = time.monotonic(), None
        proc = subprocess.Popen(train_cmd(args, ref), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:   # time the run, and when its first checkpoint appeared
            if first_save is None and os.path.exists(ref_ckpt):
                first_save = time.monotonic() - t0
            time.sleep(0.01)
        if proc.returncode != 0:
            raise RuntimeError(f"the reference run failed: {proc.stderr.read().strip()[-500:]}")
        ref_seconds = time.monotonic() - t0
        # with --after-first-save the kill is drawn over the training that follows the first save
        window = ref_seconds - (first_save or 0) if args.after_first_save else ref_seconds
        steps = torch.load(ref_ckpt, weights_only=True)["step"]
        print(f"reference: {' '.join(train_cmd(args, 'OUT')[1:])}\n  {steps} steps in {ref_seconds:.1f} s, "
              f"first checkpoint after {first_save or 0:.1f} s")
        same = 0
        for i in range(args.trials):
            ok, what = trial(args, ref_ckpt, window, rng, os.path.join(tmp, f"trial{i}"))
            same += ok
            print(f"trial {i + 1}: {what}", flush=True)
    print(f"identical: {same}/{args.trials}")
    return 0 if same == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
