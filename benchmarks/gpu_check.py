"""Everything a session with a GPU should measure, in one command that fits in a few minutes.

    python benchmarks/gpu_check.py              # one CUDA GPU, < 8 minutes: writes results/gpu_check.md
    python benchmarks/gpu_check.py --dry-run    # no GPU: tiny shapes, Triton's interpreter, < 1 minute

Each line is written to the report as it is measured, so that a run cut short keeps what it got: the
environment; each kernel's first-use check in every dtype; tests/test_kernels.py and test_first_use.py on
CUDA tensors; each kernel timed against what it replaces and the H100 roofline (roofline.py); the default
training with --kernels triton and torch from one seed (losses, weights, test R@1); sampling throughput. A
step that would overrun --budget-min is cut, one that fails is reported, and the next one runs. Without CUDA
only --dry-run runs, which never writes results/gpu_check.md: its figures must come from a GPU.
"""
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
if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:   # before torch and triton, here and in subprocesses
    os.environ.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import diffgap as dg  # noqa: E402
import kernels  # noqa: E402
from embed_cache.base import atomic_write  # noqa: E402
import roofline  # noqa: E402  (beside this file)

DEFAULT_OUT = os.path.join(ROOT, "results", "gpu_check.md")
DTYPES = ("float32", "float16", "bfloat16")
TINY_DATA = "synthetic:n_train=256,n_val=64,n_test=64,dim=32,rank=8,classes=16,nuisance_rank=4"
RETRIEVAL_ROW = re.compile(r"^(B->A|A->B)\s+(\S+)(\s\*)?\s+(?:(-?\d+\.\d)\s+)?(-?\d+\.\d)\s+\[")   # val R@1, R@1


class Report:
    """Markdown lines printed as they come, the file rewritten (atomically) after each; lines[2]: the status."""

    def __init__(self, path: str, title: str):
        self.path, self.lines = path, [title, "", "Status: incomplete (stopped, or running, after the last line).", ""]

    def add(self, line: str = "", status: str | None = None) -> None:
        if status:
            self.lines[2] = line = f"Status: {status}."
        else:
            self.lines.append(line)
        print(line, flush=True)
        atomic_write(self.path, lambda f: f.write(("\n".join(self.lines) + "\n").encode()))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b > 0 else "-"


def row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def table(align: str, *names) -> str:   # align: "l" or "r" per column
    return row(*names) + "\n|" + "".join("---|" if a == "l" else "---:|" for a in align)


def run(cmd: list, timeout: float, env: dict | None = None):
    """(exit status, None on a timeout; stdout + stderr; seconds) of a subprocess in the repository root."""
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        return res.returncode, res.stdout + res.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:   # its output is bytes, whatever text= says
        return None, ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace"), time.monotonic() - t0
    except OSError as e:   # no such program (nvidia-smi, git)
        return -1, str(e), time.monotonic() - t0


def ms(fn, dry_run: bool) -> float:
    """Median milliseconds per call: triton.testing.do_bench on a GPU; one call after a warm-up otherwise."""
    if not dry_run:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def environment(report: Report, device) -> None:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rc, drv, _ = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 30)
        report.add(f"- device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                   f"{p.multi_processor_count} SMs; driver {drv.strip() if rc == 0 else '?'}; "
                   f"CUDA {torch.version.cuda}")
    else:
        report.add(f"- device: CPU ({os.cpu_count()} cores), Triton's interpreter (a dry run: plumbing only)")
    rc, commit, _ = run(["git", "rev-parse", "--short", "HEAD"], 10)
    report.add(f"- torch {torch.__version__}, Triton {kernels.triton.__version__}, Python {platform.python_version()}, "
               f"commit {commit.strip() if rc == 0 else '?'}; fp32 dots: {kernels.fp32_dot_precision()}")


def first_use_section(report: Report, device) -> None:
    report.add("\n## First-use check\n\nEach module's self_test, run once per process, kernel, dtype and device; the "
               "first call includes Triton's compile.\n")
    report.add(table("llllrr", "kernel", "dtype", "result", "worst error / tolerance", "first call ms", "again ms"))
    for kernel, module in (("fused_linear_temb_silu", kernels.fused_mlp), ("cosine_topk", kernels.topk)):
        for dt in DTYPES:
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                try:
                    errors = module.self_test(getattr(torch, dt), device)
                except Exception as e:  # noqa: BLE001 - a failure is the finding
                    errors = e
                times.append(f"{(time.perf_counter() - t0) * 1e3:.1f}")
            if isinstance(errors, Exception):
                report.add(row(kernel, dt, f"FAIL: {type(errors).__name__}: {str(errors).strip()[:200]}", "-", *times))
                continue
            name, (err, tol) = max(errors.items(), key=lambda kv: kv[1][0] / kv[1][1] if kv[1][1] else kv[1][0] * 1e30)
            bad = ", ".join(f"{n} {e:.3g} > {t:.3g}" for n, (e, t) in errors.items() if not e <= t)
            report.add(row(kernel, dt, "FAIL: " + bad if bad else "pass", f"{name}: {err:.2g} / {tol:.2g}", *times))


def tests_section(report: Report, clock, env: dict, dry_run: bool, device) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "tests/test_first_use.py"] + (["-k", "gradcheck or exact_ties"] if dry_run else [])
    where = "the CPU (Triton's interpreter)" if dry_run else f"CUDA tensors on {torch.cuda.get_device_name(device)}"
    report.add(f"\n## Kernel tests\n\n`{' '.join(['python'] + cmd[1:])}`, the inputs on {where}:\n")
    rc, out, secs = run(cmd, min(240.0, clock() * 0.4), env)
    summary = (re.findall(r"\d+ (?:passed|failed|errors?)\b.*", out) or ["no summary line"])[-1].strip("= ")
    verdict = "timed out" if rc is None else "all passed" if rc == 0 else f"exit status {rc}"
    report.add(f"- {verdict}: {summary} ({secs:.0f} s)")
    failed = [f"  - {ln[:300]}" for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if failed:
        report.add("\n".join(failed[:20]))
    elif rc != 0:
        report.add("```\n" + "\n".join(out.splitlines()[-15:]) + "\n```")


def timing_section(report: Report, clock, device, dry_run: bool) -> None:
    report.add("\n## Kernel timings, one run (ratios below 1: the kernel is faster)\n\nTorch: cuBLAS and eager ops. "
               "The bound: the H100 SXM roofline of benchmarks/roofline.py, whatever this device is. strict=True: a "
               "kernel that fails is reported, never timed as torch.\n")
    K, N = (32, 48) if dry_run else (512, 224)
    report.add(f"Fused step silu(x W^T + b + temb), {K} -> {N}; microseconds:\n\n" + table(
        "rlrrrrrrrr", "batch", "dtype", "triton fwd", "torch fwd", "triton / torch", "triton fwd+bwd", "torch fwd+bwd",
        "triton / torch", "predicted fwd bound", "triton / bound"))
    for dt in DTYPES:
        for B in (8,) if dry_run else (64, 1024, 8192):
            if clock() < 60:
                return report.add(row(B, dt, "cut: out of time"))
            g = torch.Generator(device=device).manual_seed(0)
            x, w, b, t, dy = (torch.randn(*s, device=device, generator=g).to(getattr(torch, dt))
                              for s in ((B, K), (N, K), (N,), (B, N), (B, N)))
            params, us = [a.requires_grad_() for a in (x, w / K ** 0.5, b, t)], []
            try:
                for fn in (lambda *a: kernels.fused_linear_temb_silu(*a, strict=True),
                           kernels.fused_linear_temb_silu_reference):
                    with torch.no_grad():
                        us.append(ms(lambda: fn(*params), dry_run) * 1e3)
                    us.append(ms(lambda: fn(*params).backward(dy), dry_run) * 1e3)
            except kernels.KernelCheckError as e:
                report.add(row(B, dt, f"not timed: {str(e)[:300]}"))
                continue
            (tri, tri_b, tor, tor_b), bound = us, roofline.fused_terms(dt, B, K, N)["bound"] * 1e6
            report.add(row(B, dt, f"{tri:.1f}", f"{tor:.1f}", ratio(tri, tor), f"{tri_b:.1f}", f"{tor_b:.1f}",
                           ratio(tri_b, tor_b), f"{bound:.3g}", ratio(tri, bound)))
    M, G, D, k = (40, 600, 32, 10) if dry_run else (1000, 200_000, 512, 10)
    report.add(f"\nCosine top-{k}, {M:,} queries over {G:,} gallery rows, D = {D}; milliseconds. `chunked`: the torch "
               "path; `same`: the share of the kernel's indices equal to its (near-ties may round apart):\n\n" +
               table("lrrrrrrrr", "dtype", "triton", "full matrix + torch.topk", "triton / full", "chunked torch",
                     "triton / chunked", "predicted bound", "triton / bound", "same"))
    for dt in DTYPES:
        if clock() < 60:
            return report.add(row(dt, "cut: out of time"))
        g = torch.Generator(device=device).manual_seed(1)
        q, gal = (F.normalize(torch.randn(n, D, device=device, generator=g), dim=1).to(getattr(torch, dt))
                  for n in (M, G))
        topk = lambda: kernels.cosine_topk(q, gal, k, backend="triton", strict=True)
        try:
            tri = ms(topk, dry_run)
        except kernels.KernelCheckError as e:
            report.add(row(dt, f"not timed: {str(e)[:300]}"))
            continue
        fits = M * G * q.element_size() < (8 << 30 if dry_run else torch.cuda.mem_get_info(device)[0]) / 4
        full = ms(lambda: torch.topk(F.normalize(q, dim=1) @ F.normalize(gal, dim=1).T, k), dry_run) if fits \
            else float("nan")
        chunked = ms(lambda: kernels.cosine_topk_torch(q, gal, k), dry_run)
        same = (topk()[1] == kernels.cosine_topk_torch(q, gal, k)[1]).float().mean().item()
        block_m = kernels.topk.topk_config(M, D, k, getattr(torch, dt), interpret=False)["BLOCK_M"]
        bound = roofline.topk_terms(dt, M, G, D, k, block_m, kernels.fp32_dot_precision() == "tf32")["bound"] * 1e3
        report.add(row(dt, f"{tri:.3f}", f"{full:.3f}", ratio(tri, full), f"{chunked:.3f}", ratio(tri, chunked),
                       f"{bound:.3g}", ratio(tri, bound), f"{same:.4f}"))


def test_r_at_1(text: str) -> dict:
    """{direction: {"contrastive": R@1, "diffgap": R@1, "chosen": (score, R@1)}} from sample.py's test table."""
    out: dict = {}
    for m in filter(None, map(RETRIEVAL_ROW.match, text.splitlines())):
        d, score, star, _, r1 = m.groups()
        if score in ("contrastive", "diffgap"):
            out.setdefault(d, {})[score] = float(r1)
        if star:
            out.setdefault(d, {})["chosen"] = (score, float(r1))
    return out


def read_losses(path: str) -> dict:
    """{step: loss} from a train.py --loss-log file: one "step ... loss" line per logged step."""
    losses = {}
    for line in open(path).read().splitlines() if os.path.isfile(path) else ():
        try:
            losses[int(line.split()[0])] = float(line.split()[-1])
        except (ValueError, IndexError):
            continue
    return losses


def loss_difference(a: dict, b: dict) -> tuple:
    """(largest |a - b| over the steps both logged, at which step, how many steps compared)."""
    step = max(set(a) & set(b), key=lambda s: abs(a[s] - b[s]), default=None)
    return (float("nan"), -1, 0) if step is None else (abs(a[step] - b[step]), step, len(set(a) & set(b)))


def training_section(report: Report, clock, env: dict, dry_run: bool, workdir: str, epochs: int):
    """Train and evaluate with each kernels setting; returns a checkpoint (the triton run's if any) or None."""
    device = ["--device", "cpu" if dry_run else "cuda"]
    report.add(f"\n## Training: --kernels triton against --kernels torch, same seed\n\n`train.py --pair audio-video "
               f"--seed 0 --epochs {epochs} --no-eval --kernels MODE`, then `sample.py --steps 5` (test R@1 %):\n")
    report.add(table("lrrrll", "kernels", "steps", "train s", "sample s", "test R@1 B->A: contrastive / diffgap / "
                     "chosen", "A->B: contrastive / diffgap / chosen"))
    ckpts, losses = {}, {}
    for mode in ("triton", "torch"):
        if clock() < 90:
            report.add(row(mode, "cut: out of time"))
            break
        log, ckpt = os.path.join(workdir, f"losses-{mode}.txt"), os.path.join(workdir, mode, "audio-video", "ckpt.pt")
        rc, out, train_s = run([sys.executable, "train.py", "--pair", "audio-video", "--seed", "0", "--epochs",
                                str(epochs), "--no-eval", "--kernels", mode, "--out", os.path.join(workdir, mode),
                                "--loss-log", log]
                               + (["--data", TINY_DATA, "--switch-every", "4", "--num-samples", "2"] if dry_run else [])
                               + device, min(240.0, clock() * (0.3 if mode == "triton" else 0.45)), env)
        steps, what = (re.search(r"training (\d+) steps", out) or [None, "?"])[1], "train.py"
        if rc == 0:
            ckpts[mode], losses[mode], what = ckpt, read_losses(log), f"{steps} | {train_s:.0f} | sample.py"
            tiny = ["--num-samples", "2", "--direction", "b2a", "--score", "diffgap"] if dry_run else []   # no val
            rc, out, sample_s = run([sys.executable, "sample.py", "--ckpt", ckpt, "--steps", "5", "--kernels", mode] +
                                    tiny + device, min(180.0, clock() * 0.3), env)
        if rc != 0:
            report.add(row(mode, f"{what} {'timed out' if rc is None else f'failed ({rc})'}") + "\n```\n" +
                       "\n".join(ln[:300] for ln in out.splitlines()[-6:]) + "\n```")
            continue
        r = test_r_at_1(out)
        cell = lambda d: (f"{r[d].get('contrastive', float('nan')):.1f} / {r[d].get('diffgap', float('nan')):.1f} / "
                          f"{r[d]['chosen'][1]:.1f} ({r[d]['chosen'][0]})" if "chosen" in r.get(d, {}) else "not found")
        report.add(row(mode, steps, f"{train_s:.0f}", f"{sample_s:.0f}", cell("B->A"), cell("A->B")))
    if len(ckpts) == 2:
        a, b = (torch.load(ckpts[m], map_location="cpu", weights_only=True)["model"] for m in ("triton", "torch"))
        floats = [n for n in a if a[n].is_floating_point()]
        diff = max(((a[n].double() - b[n].double()).abs().max().item() for n in floats), default=0.0)
        scale = max((a[n].abs().max().item() for n in floats), default=0.0)
        d, step, n = loss_difference(losses["triton"], losses["torch"])
        report.add(f"\n- final weights: largest difference {diff:.3g} (largest weight {scale:.3g})\n"
                   f"- losses: largest difference {d:.3g} at step {step}, over {n} logged steps")
    return ckpts.get("triton") or ckpts.get("torch")


def sampling_section(report: Report, clock, device, dry_run: bool, ckpt) -> None:
    report.add("\n## Sampling throughput: 5 DDIM steps, guidance 16, one sample per condition (samples/s)\n")
    if ckpt is None:
        model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=32, dim_b=32) if dry_run else dg.DiffGAPConfig())
        report.add("(no checkpoint from the training step: an untrained default model)\n")
    else:   # a checkpoint is a plain dict of the config and the state dict (README)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = dg.DiffGAP(dg.DiffGAPConfig(**state["config"]))
        model.load_state_dict(state["model"])
    model.to(device).eval()
    report.add(table("rrrr", "batch", "kernels triton", "kernels torch", "triton / torch time"))
    before = dg.KERNELS
    try:
        for B in (4, 16) if dry_run else (64, 1024, 16384):
            if clock() < 20:
                return report.add(row(B, "cut: out of time"))
            g, secs = torch.Generator().manual_seed(0), {}
            cond = F.normalize(torch.randn(B, model.config.dim_b, generator=g), dim=1).to(device)
            for mode in ("triton", "torch"):
                dg.KERNELS = mode
                secs[mode] = ms(lambda: model.sample(cond, 0, steps=5, guidance=16.0, generator=torch.Generator(
                    device=device).manual_seed(0)), dry_run) / 1e3
            report.add(row(B, f"{B / secs['triton']:,.0f}", f"{B / secs['torch']:,.0f}",
                           ratio(secs["triton"], secs["torch"])))
    finally:
        dg.KERNELS = before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)   # --dry-run is read from sys.argv before argparse runs
    p.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes under Triton's interpreter (< 1 minute)")
    p.add_argument("--out", help="the report (default results/gpu_check.md; with --dry-run a temporary file)")
    p.add_argument("--budget-min", type=float, default=7.5, help="stop starting new work after this many minutes")
    p.add_argument("--train-epochs", type=int, default=10, help="epochs of the default data per training run")
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "tests", "timing", "training", "sampling"])
    args = p.parse_args(argv)
    out = args.out or (os.path.join(tempfile.gettempdir(), "gpu_check_dry_run.md") if args.dry_run else DEFAULT_OUT)
    if args.dry_run and (os.path.abspath(out) == DEFAULT_OUT or os.environ.get("TRITON_INTERPRET") != "1"):
        print(f"error: {out}: --dry-run never writes the committed report, and needs TRITON_INTERPRET=1 before torch "
              f"(python benchmarks/gpu_check.py --dry-run sets it)", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here: run on a GPU, or with --dry-run to test the plumbing", file=sys.stderr)
        return 2
    device, env = torch.device("cpu" if args.dry_run else "cuda"), dict(os.environ, PYTHONUNBUFFERED="1")
    end, clock = time.monotonic() + 60 * args.budget_min, lambda: end - time.monotonic()   # clock(): seconds left
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report = Report(out, "# GPU check" + (" (dry run: tiny shapes, Triton's interpreter, no GPU)" * args.dry_run))
    report.add(f"Written by `python benchmarks/gpu_check.py{' --dry-run' if args.dry_run else ''}` on "
               f"{datetime.datetime.now():%Y-%m-%d %H:%M}; every figure is from this one run.\n")
    ckpt = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = {"environment": lambda: environment(report, device),
                 "check": lambda: first_use_section(report, device),
                 "tests": lambda: tests_section(report, clock, env, args.dry_run, device),
                 "timing": lambda: timing_section(report, clock, device, args.dry_run),
                 "training": lambda: ckpt.update(path=training_section(report, clock, env, args.dry_run, workdir,
                                                                       2 if args.dry_run else args.train_epochs)),
                 "sampling": lambda: sampling_section(report, clock, device, args.dry_run, ckpt.get("path"))}
        for name, step in steps.items():
            if name in args.skip or clock() <= 0:
                report.add(f"\n## {name}: {'skipped (--skip)' if name in args.skip else 'cut: out of time'}")
                continue
            try:
                step()
            except Exception as e:  # noqa: BLE001 - record it and go on to the next step
                report.add(f"\n**{name} failed**: {type(e).__name__}: {str(e).strip()[:500]}")
    if ours := [w for w in caught if issubclass(w.category, kernels.KernelFallbackWarning)]:
        report.add("\n## Kernel warnings in this process\n\n" + "\n".join(f"- {w.message}" for w in ours[:10]))
    report.add(status=f"complete in {60 * args.budget_min - clock():.0f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
