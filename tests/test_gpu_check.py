"""benchmarks/gpu_check.py works before a GPU exists: its --dry-run runs every step with tiny shapes
under Triton's interpreter, and writes its report elsewhere than the committed results/gpu_check.md."""
import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
COMMITTED = os.path.join(ROOT, "results", "gpu_check.md")


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_dry_run_runs_every_step_and_leaves_the_committed_report_alone(tmp_path):
    out = tmp_path / "check.md"
    before = digest(COMMITTED)
    res = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert digest(COMMITTED) == before
    text = out.read_text()
    assert "Status: complete" in text and "failed**" not in text, text
    for header in ("## First-use check", "## Kernel tests", "## Kernel timings", "## Training", "## Sampling throughput"):
        assert header in text, header
    # 2 kernels x 3 dtypes pass their first-use check; the tests pass; each timing row has its ratios
    assert len(re.findall(r"^\| (fused_linear_temb_silu|cosine_topk) \| \w+ \| pass \|", text, re.M)) == 6
    assert re.search(r"^- all passed: \d+ passed", text, re.M)
    assert len(re.findall(r"^\| 8 \| \w+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", text, re.M)) == 3
    assert len(re.findall(r"^\| \w+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+ \| [\d.]+x \| [\d.e-]+ \| [\d.]+x \| 1\.0000 \|",
                          text, re.M)) == 3
    # both training runs trained and were evaluated on the test split; sampling timed both settings
    for mode in ("triton", "torch"):
        assert re.search(rf"^\| {mode} \| \d+ \| \d+ \| \d+ \| [\d.]+ / [\d.]+ / [\d.]+ \(\S+\) \|", text, re.M), mode
    assert re.search(r"^- final weights: largest difference", text, re.M)
    assert len(re.findall(r"^\| (4|16) \| [\d,]+ \| [\d,]+ \| [\d.]+x \|", text, re.M)) == 2
    # what it printed is what it wrote, line by line as it went
    assert "| fused_linear_temb_silu | float32 | pass |" in res.stdout and f"wrote {out}" in res.stdout


def test_dry_run_refuses_to_write_the_committed_report():
    res = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", COMMITTED], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "--dry-run" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_real_run_needs_a_gpu(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "x.md")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "error: no CUDA device" in res.stderr and not (tmp_path / "x.md").exists()


SAMPLE_TABLE = """\
direction score                 val R@1    R@1 95% CI           R@5   R@10  mAP@10  medR  R@1 gain over contrastive
B->A      contrastive               7.8   15.6 [7.8, 25.0]     45.3   56.2    25.8     7
B->A      diffgap                   7.8    4.7 [0.0, 10.9]     26.6   43.8    13.4    14  -10.9 [-20.3, -3.1]
B->A      two-way-blend-0.5 *      12.5   10.9 [4.7, 18.8]     37.5   53.1    21.3     9   -4.7 [-12.5, 1.6]
B->A      oracle                          18.8                 46.9   67.2    31.9     6
A->B      contrastive               7.8   14.1 [6.2, 23.4]     39.1   53.1    24.0     9
A->B      diffgap *                 4.7    6.2 [1.6, 12.5]     32.8   46.9    17.3    14   -7.8 [-18.8, 1.6]
"""


def test_test_r_at_1_reads_sample_py_tables():
    assert gpu_check.test_r_at_1(SAMPLE_TABLE) == {
        "B->A": {"contrastive": 15.6, "diffgap": 4.7, "chosen": ("two-way-blend-0.5", 10.9)},
        "A->B": {"contrastive": 14.1, "diffgap": 6.2, "chosen": ("diffgap", 6.2)}}
    no_val = ("B->A      contrastive             15.6 [7.8, 25.0]     45.3   56.2    25.8     7\n"   # --score NAME
              "B->A      diffgap *                7.8 [1.6, 14.1]     21.9   37.5    13.7    15   -7.8 [-17.2, 1.6]\n")
    assert gpu_check.test_r_at_1(no_val) == {"B->A": {"contrastive": 15.6, "diffgap": 7.8, "chosen": ("diffgap", 7.8)}}


def test_loss_logs_compare_on_common_steps(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1 0.50\n2 0.40\n3 0.30\n")
    b.write_text("1 0.50\n2 0.45\nnot a line\n4 0.1\n")
    la, lb = gpu_check.read_losses(str(a)), gpu_check.read_losses(str(b))
    assert lb == {1: 0.5, 2: 0.45, 4: 0.1}
    diff, step, n = gpu_check.loss_difference(la, lb)
    assert step == 2 and n == 2 and diff == pytest.approx(0.05)
