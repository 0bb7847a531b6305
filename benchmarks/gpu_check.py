"""Everything a session with a GPU should measure, in one command that fits in a few minutes.

    python benchmarks/gpu_check.py              # one CUDA GPU, < 8 minutes: writes results/gpu_check.md
    python benchmarks/gpu_check.py --dry-run    # no GPU: the same steps with tiny shapes under Triton's
                                                # interpreter, < 1 minute; writes a temporary file

No GPU had run this project's Triton kernels before this script. In order, each step printed as
it is measured and appended to the report at once, so that a run cut short keeps what it got:

1. the environment: device, driver, CUDA runtime, torch, Triton, commit;
2. the first-use check of each kernel in fp32 / fp16 / bf16 (kernels/first_use.py): pass or
   fail, the largest error against its tolerance, and what the check costs (first call, which
   compiles, and again);
3. the kernel tests (tests/test_kernels.py, tests/test_first_use.py) run by pytest with their
   inputs on the GPU: CUDA tensors, not the interpreter;
4. each kernel timed against what it replaces (cuBLAS plus torch's eager ops; the full score
   matrix and torch.topk where it fits in memory; the chunked torch path) and against the
   predicted H100 roofline of kernels/roofline.py (benchmarks/kernel_report.py prints it), as
   ratios from this one run;
5. the default training for a few thousand steps with --kernels triton and with --kernels torch
   from the same seed (train.py and sample.py run as subprocesses): the largest difference of
   their losses when train.py can log them (--loss-log), of their final weights, and both
   runs' test R@1 from `sample.py --steps 5`;
6. sampling throughput, 5 guided DDIM steps, at a few batch sizes, kernels against torch.

Each step has a share of a time budget (--budget-min, default 7.5); a step that would overrun
is cut and says so. Without CUDA, only --dry-run runs (exit 2 otherwise); it never writes
results/gpu_check.md, whose figures must come from a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_OUT = os.path.join(ROOT, "results", "gpu_check.md")
DTYPES = ("float32", "float16", "bfloat16")
TINY_DATA = "synthetic:n_train=256,n_val=64,n_test=64,dim=32,rank=8,classes=16,nuisance_rank=4"


class Report:
    """Markdown lines printed as they come and rewritten to `path` after each one (atomically)."""

    def __init__(self, path: str):
        self.path, self.lines = path, []
        self.status_at = None

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.write()

    def status(self, text: str) -> None:
        """The line under the title that says whether the run finished."""
        self.lines[self.status_at] = f"Status: {text}."
        print(f"[status] {text}", flush=True)
        self.write()

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        os.replace(tmp, self.path)


class Clock:
    """The time budget: seconds left overall, and a step's share of it."""

    def __init__(self, minutes: float):
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b > 0 else "-"


def run(cmd: list[str], timeout: float, env: dict) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, stdout + stderr, seconds) of a subprocess in the repository root."""
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        return res.returncode, res.stdout + res.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out, time.monotonic() - t0


def tail(text: str, lines: int = 6) -> str:
    keep = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in keep)


# ---------------------------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------------------------

def environment(report: Report, device, dry_run: bool) -> None:
    import torch
    import triton
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = "unknown (no nvidia-smi)"
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        report.add(f"- device: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                   f"{props.multi_processor_count} SMs")
        report.add(f"- driver {driver}, CUDA runtime {torch.version.cuda}")
    else:
        report.add(f"- device: CPU ({os.cpu_count()} cores), Triton's interpreter (dry run: plumbing only, "
                   f"no figure here says anything about a GPU)")
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or commit
    except (OSError, subprocess.SubprocessError):
        pass
    report.add(f"- torch {torch.__version__}, Triton {triton.__version__}, Python {platform.python_version()}, "
               f"commit {commit}")
    import kernels
    report.add(f"- fp32 dots: {kernels.fp32_dot_precision()} (follows torch's TF32 setting)")


# ---------------------------------------------------------------------------------------------
# 2. first-use check
# ---------------------------------------------------------------------------------------------

def first_use_section(report: Report, device) -> None:
    import importlib

    import torch
    from kernels import first_use
    report.add("\n## First-use check (kernels/first_use.py)\n")
    report.add("What every process runs once per kernel, dtype and device before trusting a kernel. "
               "The first call includes Triton's compile; `again` is the check alone.\n")
    report.add("| kernel | dtype | result | worst error / tolerance | first call ms | again ms |")
    report.add("|---|---|---|---|---:|---:|")
    for kernel, module in (("fused_linear_temb_silu", "fused_mlp"), ("cosine_topk", "cosine_topk")):
        self_test = importlib.import_module(f"kernels.{module}").self_test
        for dt in DTYPES:
            dtype = getattr(torch, dt)
            first = first_use.run_check(kernel, dtype, device, self_test)
            again = first_use.run_check(kernel, dtype, device, self_test) if first.ok else first
            if first.errors:
                ratio = lambda kv: kv[1][0] / kv[1][1] if kv[1][1] else (float("inf") if kv[1][0] else 0.0)
                name, (err, tol) = max(first.errors.items(), key=ratio)
                worst = f"{name}: {err:.2g} / {tol:.2g}"
            else:
                worst = "-"
            result = "pass" if first.ok else f"FAIL: {first.message}"
            report.add(f"| {kernel} | {dt} | {result} | {worst} | {first.ms:.1f} | {again.ms:.1f} |")


# ---------------------------------------------------------------------------------------------
# 3. kernel tests
# ---------------------------------------------------------------------------------------------

def tests_section(report: Report, clock: Clock, env: dict, dry_run: bool, device) -> None:
    report.add("\n## Kernel tests\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
           "tests/test_kernels.py", "tests/test_first_use.py"]
    if dry_run:   # the plumbing: a few of the tests
        cmd += ["-k", "gradcheck or exact_ties"]
    where = "CUDA tensors on " + report_device(device) if device.type == "cuda" else "the CPU, under Triton's interpreter"
    report.add(f"`{' '.join(['python'] + cmd[1:])}` with the inputs on {where}:\n")
    rc, out, secs = run(cmd, min(240.0, clock.left() * 0.4), env)
    summary = next((ln.strip("= ") for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", ln)),
                   "no summary line")
    verdict = "timed out" if rc is None else ("all passed" if rc == 0 else f"exit status {rc}")
    report.add(f"- {verdict}: {summary} ({secs:.0f} s)")
    failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    for ln in failed[:20]:
        report.add(f"  - {ln[:300]}")
    if rc not in (0,) and not failed:
        report.add("```\n" + tail(out, 15) + "\n```")


def report_device(device) -> str:
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---------------------------------------------------------------------------------------------
# 4. kernel timings
# ---------------------------------------------------------------------------------------------

def bench_ms(fn, device, dry_run: bool) -> float:
    """Median milliseconds per call: triton.testing.do_bench on CUDA; one timed call after one warm-up otherwise."""
    import torch
    if device.type == "cuda" and not dry_run:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def checked(kernel: str, t) -> bool:
    """Whether the kernel passed its first-use check for t's dtype and device (running it if needed):
    a failed kernel's public function returns the torch path's results, which must not be timed as the kernel's."""
    import importlib

    from kernels import first_use
    module = importlib.import_module("kernels." + ("fused_mlp" if kernel == "fused_linear_temb_silu" else "cosine_topk"))
    return first_use.usable(kernel, t, False, module.self_test)


def timing_section(report: Report, clock: Clock, device, dry_run: bool) -> None:
    import torch
    import torch.nn.functional as F

    import kernels
    from kernels import roofline
    from kernels.cosine_topk import topk_config
    report.add("\n## Kernel timings, one run (ratios below 1: the kernel is faster)\n")
    report.add("Torch is what each kernel replaces: cuBLAS plus torch's eager ops. The predicted bound is the H100 "
               "SXM roofline of kernels/roofline.py (printed by benchmarks/kernel_report.py), whatever this device is.\n")
    K, N = (32, 48) if dry_run else (512, 224)
    batches = (8,) if dry_run else (64, 1024, 8192)
    report.add(f"Fused step silu(x W^T + b + temb), {K} -> {N}, temb per row; times in microseconds:\n")
    report.add("| batch | dtype | triton fwd | torch fwd | triton / torch | triton fwd+bwd | torch fwd+bwd | "
               "triton / torch | predicted fwd bound | triton / bound |")
    report.add("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        for B in batches:
            if clock.left() < 60:
                report.add(f"| {B} | {dt} | cut: out of time |")
                return
            g = torch.Generator(device=device).manual_seed(0)
            mk = lambda *shape, scale=1.0: (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)
            x, w, b, t, dy = mk(B, K), mk(N, K, scale=K ** -0.5), mk(N), mk(B, N), mk(B, N)
            params = [a.requires_grad_() for a in (x, w, b, t)]
            if not checked("fused_linear_temb_silu", x):
                report.add(f"| {B} | {dt} | not timed: the kernel failed its first-use check |")
                continue
            times = {}
            for name, fn in (("triton", kernels.fused_linear_temb_silu), ("torch", kernels.fused_linear_temb_silu_reference)):
                with torch.no_grad():
                    times[name, "fwd"] = bench_ms(lambda: fn(x, w, b, t), device, dry_run) * 1e3
                times[name, "all"] = bench_ms(lambda: fn(*params).backward(dy), device, dry_run) * 1e3
            bound = roofline.fused_terms(dt, B, K, N)["bound"] * 1e6
            report.add(f"| {B} | {dt} | {times['triton', 'fwd']:.1f} | {times['torch', 'fwd']:.1f} | "
                       f"{fmt_ratio(times['triton', 'fwd'], times['torch', 'fwd'])} | {times['triton', 'all']:.1f} | "
                       f"{times['torch', 'all']:.1f} | {fmt_ratio(times['triton', 'all'], times['torch', 'all'])} | "
                       f"{bound:.3g} | {fmt_ratio(times['triton', 'fwd'], bound)} |")
            del x, w, b, t, dy, params

    M, G, D, k = (40, 600, 32, 10) if dry_run else (1000, 200_000, 512, 10)
    report.add(f"\nCosine top-{k}, {M:,} queries over {G:,} gallery rows, D = {D}; times in milliseconds. "
               f"`full matrix` normalises, multiplies and calls torch.topk on the (Q, G) scores; `chunked` is the "
               f"kernel's torch fallback (fp32 scores, ties to the lower index); `same` is the share of the kernel's "
               f"indices equal to the chunked path's (near-ties may round apart):\n")
    report.add("| dtype | triton | full matrix + torch.topk | triton / full | chunked torch | triton / chunked | "
               "predicted bound | triton / bound | same |")
    report.add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dt in DTYPES:
        if clock.left() < 60:
            report.add(f"| {dt} | cut: out of time |")
            return
        dtype = getattr(torch, dt)
        g = torch.Generator(device=device).manual_seed(1)
        q = F.normalize(torch.randn(M, D, device=device, generator=g), dim=1).to(dtype)
        gal = F.normalize(torch.randn(G, D, device=device, generator=g), dim=1).to(dtype)
        if not checked("cosine_topk", q):
            report.add(f"| {dt} | not timed: the kernel failed its first-use check |")
            continue
        tri = bench_ms(lambda: kernels.cosine_topk(q, gal, k, backend="triton"), device, dry_run)
        full_bytes = M * G * q.element_size()
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 << 30
        full = float("nan")
        if full_bytes < free / 4:
            full = bench_ms(lambda: torch.topk(F.normalize(q, dim=1) @ F.normalize(gal, dim=1).T, k, dim=1), device, dry_run)
        chunked = bench_ms(lambda: kernels.cosine_topk_torch(q, gal, k), device, dry_run)
        same = (kernels.cosine_topk(q, gal, k, backend="triton")[1] == kernels.cosine_topk_torch(q, gal, k)[1])
        same = f"{same.float().mean().item():.4f}"
        cfg = topk_config(M, D, k, dtype, interpret=False)
        bound = roofline.topk_terms(dt, M, G, D, k, cfg["BLOCK_M"], tf32=kernels.fp32_dot_precision() == "tf32")["bound"] * 1e3
        report.add(f"| {dt} | {tri:.3f} | {full:.3f} | {fmt_ratio(tri, full)} | {chunked:.3f} | {fmt_ratio(tri, chunked)} | "
                   f"{bound:.3g} | {fmt_ratio(tri, bound)} | {same} |")
        del q, gal
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 5. training with each kernels setting
# ---------------------------------------------------------------------------------------------

RETRIEVAL_ROW = re.compile(r"^(B->A|A->B)\s+(\S+)(\s\*)?\s+(-?\d+\.\d)\s+(-?\d+\.\d)\s+\[")


def test_r_at_1(text: str) -> dict:
    """{direction: {"contrastive": R@1, "diffgap": R@1, "chosen": (score, R@1)}} from sample.py's test table."""
    out: dict = {}
    for line in text.splitlines():
        m = RETRIEVAL_ROW.match(line)
        if not m:
            continue
        d, score, star, _, r1 = m.groups()
        row = out.setdefault(d, {})
        if score in ("contrastive", "diffgap"):
            row[score] = float(r1)
        if star:
            row["chosen"] = (score, float(r1))
    return out


def read_losses(path: str) -> dict[int, float]:
    """{step: loss} from a train.py --loss-log file: one "step loss" line per logged step."""
    losses = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    try:
                        losses[int(parts[0])] = float(parts[-1])
                    except ValueError:
                        continue
    return losses


def loss_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, int, int]:
    """(largest |a - b| over the steps both logged, at which step, how many steps compared)."""
    common = sorted(set(a) & set(b))
    if not common:
        return float("nan"), -1, 0
    step = max(common, key=lambda s: abs(a[s] - b[s]))
    return abs(a[step] - b[step]), step, len(common)


def weight_difference(path_a: str, path_b: str) -> tuple[float, float]:
    """(largest |a - b| over every model tensor of two checkpoints, the largest |weight| for scale)."""
    import torch
    a = torch.load(path_a, map_location="cpu", weights_only=True)["model"]
    b = torch.load(path_b, map_location="cpu", weights_only=True)["model"]
    diff = max(((a[n].double() - b[n].double()).abs().max().item() for n in a if a[n].is_floating_point()), default=0.0)
    scale = max((a[n].abs().max().item() for n in a if a[n].is_floating_point()), default=0.0)
    return diff, scale


def training_section(report: Report, clock: Clock, env: dict, dry_run: bool, workdir: str, epochs: int) -> str | None:
    """Train and evaluate with each kernels setting; returns the triton run's checkpoint (or None)."""
    report.add("\n## Training: --kernels triton against --kernels torch, same seed\n")
    logs_losses = "--loss-log" in open(os.path.join(ROOT, "train.py")).read()
    data = ["--data", TINY_DATA, "--switch-every", "4", "--num-samples", "2"] if dry_run else []
    device = ["--device", "cpu" if dry_run else "cuda"]
    words = "tiny synthetic data" if dry_run else "the default synthetic data"
    report.add(f"`python train.py --pair audio-video --seed 0 --epochs {epochs} --no-eval --kernels MODE` on {words}, "
               f"then `python sample.py --steps 5 --kernels MODE` on its checkpoint (test split, R@1 %):\n")
    report.add("| kernels | steps | train s | sample s | test R@1 B->A: contrastive / diffgap / chosen | "
               "A->B: contrastive / diffgap / chosen |")
    report.add("|---|---:|---:|---:|---|---|")
    ckpts, losses = {}, {}
    for mode in ("triton", "torch"):
        if clock.left() < 90:
            report.add(f"| {mode} | cut: out of time |")
            break
        out_dir = os.path.join(workdir, f"runs-{mode}")
        cmd = [sys.executable, "train.py", "--pair", "audio-video", "--seed", "0", "--epochs", str(epochs),
               "--no-eval", "--kernels", mode, "--out", out_dir] + data + device
        if logs_losses:
            cmd += ["--loss-log", os.path.join(workdir, f"losses-{mode}.txt")]
        rc, out, train_s = run(cmd, min(240.0, clock.left() * (0.3 if mode == "triton" else 0.45)), env)
        if rc != 0:
            report.add(f"| {mode} | train.py {'timed out' if rc is None else f'failed ({rc})'} |")
            report.add("```\n" + tail(out) + "\n```")
            continue
        steps = re.search(r"training (\d+) steps", out)
        ckpts[mode] = os.path.join(out_dir, "audio-video", "ckpt.pt")
        losses[mode] = read_losses(os.path.join(workdir, f"losses-{mode}.txt"))
        cmd = [sys.executable, "sample.py", "--ckpt", ckpts[mode], "--steps", "5", "--kernels", mode] + \
              (["--num-samples", "2", "--direction", "b2a"] if dry_run else []) + device
        rc, out, sample_s = run(cmd, min(180.0, clock.left() * 0.3), env)
        if rc != 0:
            report.add(f"| {mode} | {steps.group(1) if steps else '?'} | {train_s:.0f} | sample.py "
                       f"{'timed out' if rc is None else f'failed ({rc})'} |")
            report.add("```\n" + tail(out) + "\n```")
            continue
        r = test_r_at_1(out)
        cell = lambda d: (f"{r[d].get('contrastive', float('nan')):.1f} / {r[d].get('diffgap', float('nan')):.1f} / "
                          f"{r[d]['chosen'][1]:.1f} ({r[d]['chosen'][0]})" if d in r and "chosen" in r[d] else "not found")
        report.add(f"| {mode} | {steps.group(1) if steps else '?'} | {train_s:.0f} | {sample_s:.0f} | {cell('B->A')} | "
                   f"{cell('A->B')} |")
    if len(ckpts) == 2:
        diff, scale = weight_difference(ckpts["triton"], ckpts["torch"])
        report.add(f"\n- final weights: largest difference {diff:.3g} (largest weight {scale:.3g})")
        if logs_losses:
            d, step, n = loss_difference(losses["triton"], losses["torch"])
            report.add(f"- losses: largest difference {d:.3g} at step {step}, over {n} logged steps")
        else:
            report.add("- losses: not compared (train.py has no --loss-log to write them)")
    return ckpts.get("triton") or ckpts.get("torch")


# ---------------------------------------------------------------------------------------------
# 6. sampling throughput
# ---------------------------------------------------------------------------------------------

def sampling_section(report: Report, clock: Clock, device, dry_run: bool, ckpt: str | None) -> None:
    import torch
    import torch.nn.functional as F

    import diffgap as dg
    report.add("\n## Sampling throughput: 5 DDIM steps, guidance 16, one sample per condition (samples/s)\n")
    if ckpt is None:
        model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=32, dim_b=32) if dry_run else dg.DiffGAPConfig())
        report.add("(no checkpoint from the training step: an untrained default model)\n")
    else:   # a checkpoint is a plain dict of the config and the state dict (README)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = dg.DiffGAP(dg.DiffGAPConfig(**state["config"]))
        model.load_state_dict(state["model"])
    model.to(device).eval()
    report.add("| batch | kernels triton | kernels torch | triton / torch time |")
    report.add("|---:|---:|---:|---:|")
    kernels_before = dg.KERNELS
    try:
        for B in ((4, 16) if dry_run else (64, 1024, 16384)):
            if clock.left() < 20:
                report.add(f"| {B} | cut: out of time |")
                return
            g = torch.Generator(device=device).manual_seed(0)
            cond = F.normalize(torch.randn(B, model.config.dim_b, device=device, generator=g), dim=1)
            secs = {}
            for mode in ("triton", "torch"):
                dg.KERNELS = mode
                sample = lambda: model.sample(cond, 0, steps=5, guidance=16.0,
                                              generator=torch.Generator(device=device).manual_seed(0))
                secs[mode] = bench_ms(sample, device, dry_run) / 1e3
            report.add(f"| {B} | {B / secs['triton']:,.0f} | {B / secs['torch']:,.0f} | "
                       f"{fmt_ratio(secs['triton'], secs['torch'])} |")
    finally:
        dg.KERNELS = kernels_before


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: tiny shapes under Triton's interpreter, to test this script (< 1 minute)")
    p.add_argument("--out", help=f"the report (default: {os.path.relpath(DEFAULT_OUT, ROOT)}; with --dry-run a "
                                 f"temporary file)")
    p.add_argument("--budget-min", type=float, default=7.5, help="stop starting new work after this many minutes")
    p.add_argument("--train-epochs", type=int, default=10,
                   help="epochs of the default synthetic data per training run (10: 3,130 steps of batch 64)")
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "tests", "timing", "training", "sampling"],
                   help="steps to leave out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # before torch, kernels and triton's @jit functions are imported: the interpreter runs the
        # kernels on the CPU, here and in every subprocess, even on a machine with a GPU
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        out = args.out or os.path.join(tempfile.gettempdir(), "gpu_check_dry_run.md")
        if os.path.abspath(out) == DEFAULT_OUT:
            print(f"error: {out}: --dry-run never writes the committed report; give another --out", file=sys.stderr)
            return 2
    else:
        out = args.out or DEFAULT_OUT
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here: run on a GPU, or with --dry-run to test the plumbing", file=sys.stderr)
        return 2
    device = torch.device("cuda") if not args.dry_run else torch.device("cpu")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    epochs = 2 if args.dry_run else args.train_epochs
    clock = Clock(args.budget_min)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report = Report(out)
    report.add("# GPU check" + (" (dry run: tiny shapes, Triton's interpreter, no GPU)" if args.dry_run else ""))
    report.add("")
    report.status_at = len(report.lines)
    report.add("Status: incomplete: the run stopped (or is still running) after the last line below.")
    report.add("")
    report.add(f"Written by `python benchmarks/gpu_check.py{' --dry-run' if args.dry_run else ''}` on "
               f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; every figure is from this one run.\n")
    caught = []
    steps = [("check", lambda: first_use_section(report, device)),
             ("tests", lambda: tests_section(report, clock, env, args.dry_run, device)),
             ("timing", lambda: timing_section(report, clock, device, args.dry_run))]
    ckpt = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        steps += [("training", lambda: ckpt.update(path=training_section(report, clock, env, args.dry_run, workdir, epochs))),
                  ("sampling", lambda: sampling_section(report, clock, device, args.dry_run, ckpt.get("path")))]
        environment(report, device, args.dry_run)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, step in steps:
                if name in args.skip:
                    report.add(f"\n## {name}: skipped (--skip)")
                    continue
                if clock.left() <= 0:
                    report.add(f"\n## {name}: cut, out of time (--budget-min {args.budget_min:g})")
                    continue
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - record it and go on to the next step
                    report.add(f"\n**{name} failed**: {type(e).__name__}: {str(e).strip()[:500]}")
    kernel_warnings = [w for w in caught if "kernels" in str(w.category.__module__)]
    if kernel_warnings:
        report.add("\n## Kernel warnings in this process\n")
        for w in kernel_warnings[:10]:
            report.add(f"- {w.category.__name__}: {w.message}")
    report.status(f"complete in {args.budget_min * 60 - clock.left():.0f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
