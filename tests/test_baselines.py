"""The baselines of benchmarks/baselines.py and the quick modes of the research driver, benchmarks/research.py."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffgap as dg
import diffgap_eval as ev
import embed_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESEARCH = os.path.join(ROOT, "benchmarks", "research.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from baselines import MLPBaseline, Ridge, fit_ridge  # noqa: E402


def test_ridge_matches_numpy_least_squares():
    rng = np.random.default_rng(0)
    x, y, lam = rng.normal(size=(50, 6)), rng.normal(size=(50, 3)), 0.7
    xc, yc = x - x.mean(0), y - y.mean(0)
    # ridge = least squares on the augmented system [X; sqrt(lam) I] W = [Y; 0]
    w, *_ = np.linalg.lstsq(np.vstack([xc, np.sqrt(lam) * np.eye(6)]), np.vstack([yc, np.zeros((6, 3))]), rcond=None)
    ridge = Ridge(torch.from_numpy(x), torch.from_numpy(y)).fit(lam)
    assert np.allclose(ridge.W.numpy(), w, atol=1e-10)
    x_new = rng.normal(size=(4, 6))
    assert np.allclose(ridge(torch.from_numpy(x_new)).numpy(), (x_new - x.mean(0)) @ w + y.mean(0), atol=1e-10)
    # lam -> 0 is ordinary least squares
    w0, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    assert np.allclose(Ridge(torch.from_numpy(x), torch.from_numpy(y)).fit(0.0).W.numpy(), w0, atol=1e-10)


def test_ridge_lambda_is_the_best_on_validation():
    ds = embed_cache.load("synthetic:seed=1,n_train=600,n_val=100,n_test=100,dim=32,rank=8,classes=20", "audio-video")
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=32, dim_b=32))
    model.fit_stats(ds.splits["train"].a, ds.splits["train"].b)
    ridge, grid = fit_ridge(model, ds.splits["train"], ds.splits["val"], 0)
    assert len(grid) == 7 and grid[ridge.lam] == max(grid.values())


@pytest.mark.parametrize("cfg", [dg.DiffGAPConfig(), dg.DiffGAPConfig(dim_b=64), dg.DiffGAPConfig(hidden=256, inner=96)])
def test_mlp_has_the_denoisers_parameter_budget(cfg):
    mlp, diffusion = MLPBaseline(cfg), dg.DiffGAP(cfg)
    assert abs(mlp.num_params() / diffusion.num_params() - 1) < 0.10
    x = torch.nn.functional.normalize(torch.randn(5, cfg.dim_b), dim=1)
    assert mlp.predict(x, 0).shape == (5, cfg.dim_a)


def test_mlp_learns_a_linear_map():
    ds = embed_cache.load("synthetic:seed=0,n_train=2000,n_val=100,n_test=200,dim=32,rank=8,classes=20", "audio-video")
    cfg = dg.DiffGAPConfig(dim_a=32, dim_b=32, hidden=64, inner=32, switch_every=50)
    mlp = MLPBaseline(cfg)
    tr = ds.splits["train"]
    mlp.fit_stats(tr.a, tr.b)
    losses = [s["loss"] for s in dg.train_steps(mlp, *tr.pairs(), dg.make_optimizer(mlp, 1e-3), 400, 64, seed=0)]
    assert np.mean(losses[-50:]) < 0.8 * np.mean(losses[:10])
    q, g, rel = ds.splits["test"].retrieval(0)
    assert ev.paired_cosine(mlp.predict(q, 0), g, rel) > ev.paired_cosine(q, g, rel) + 0.2


def test_quick_tables_are_produced_and_well_formed(tmp_path):
    out = tmp_path / "tables.md"
    r = subprocess.run([sys.executable, RESEARCH, "tables", "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.strip() in r.stdout
    tables = re.split(r"^### ", text, flags=re.M)[1:]
    titles = [t.splitlines()[0] for t in tables]
    expected = {"Table III analogue": 18, "Table IV analogue": 18, "Table V analogue": 3, "Table VI analogue": 5,
                "Table VII analogue": 3, "Objective": 3, "Direction embedding": 2, "Guidance scale": 3,
                "Samples averaged": 3, "Blend weight": 5}
    assert len(titles) == len(expected)
    cell = re.compile(r"^-?\d+(\.\d+)? ± \d+(\.\d+)?$")
    for title, table in zip(titles, tables):
        rows = [line for line in table.splitlines() if line.startswith("| ")]   # header, then body (no |---|)
        header, body = rows[0], rows[1:]
        n_rows = next(v for k, v in expected.items() if title.startswith(k))
        assert len(body) == n_rows, title
        for line in body:
            cells = [c.strip() for c in line.strip("|").split("|")][1:]
            assert len(cells) == header.count("|") - 2, line
            for c in cells:
                # FD / paired cos do not exist for a score that is not one generated embedding
                assert cell.match(c) or (c == "-" and any(w in line for w in ("blend", "plug-in", "two-way"))), \
                    (title, line)


def test_regimes_table_has_every_method_and_a_choice_never_below_contrastive_on_val(tmp_path):
    out = tmp_path / "regimes.md"
    r = subprocess.run([sys.executable, RESEARCH, "regimes", "--quick", "--regimes", "aligned", "--pairs", "audio-video",
                        "--workers", "1", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    for method in ("contrastive", "ridge", "ridge two-way", "mlp", "mlp two-way", "plug-in", "diffgap", "two-way",
                   "auto", "oracle"):
        cells = rows[method].strip("|").split("|")[1:]
        assert len(cells) == 2 and all(re.match(r" \d+\.\d \[\d+\.\d, \d+\.\d\]", c) for c in cells), rows[method]
    assert re.search(r"\((contrastive|diffgap|two-way|blend-[\d.]+|two-way-blend-[\d.]+)\)", rows["auto"])


def test_quick_sweep_has_the_references_and_every_variant_setting(tmp_path):
    """Guidance is skipped for a variant trained without condition dropout; the references come once."""
    r = subprocess.run([sys.executable, RESEARCH, "sweep", "--quick", "--variant", "base", "--variant", "cfg:p_uncond=0.1",
                        "--eval", "K=4,steps=2", "--eval", "K=4,steps=2,guidance=4", "--seeds", "0", "1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.strip("|").split("|") for line in r.stdout.splitlines() if line.startswith("| ")][1:]
    assert [c[0].strip() for c in rows] == ["ridge", "plug-in", "base K=4 steps=2", "cfg K=4 steps=2",
                                            "cfg K=4 steps=2 guidance=4"]
    for cells in rows:
        assert len(cells) == 5 and all(re.fullmatch(r" \d+\.\d ± \d+\.\d ", c) for c in cells[1:]), cells
    assert not (tmp_path / "results").exists()   # a sweep writes no file unless --out says so


def test_gaussian_plugin_ranks_by_the_conditional_log_likelihood():
    """Differences across gallery items equal those of the exact log N(q; E[q | g], Cov(q | g))."""
    from baselines import GaussianPlugIn
    g = torch.Generator().manual_seed(0)
    L = torch.randn(10, 10, generator=g, dtype=torch.float64) / 3
    z = torch.randn(4000, 10, generator=g, dtype=torch.float64) @ L.T + torch.randn(10, generator=g, dtype=torch.float64)
    plugin = GaussianPlugIn(z[:, :4], z[:, 4:]).fit(0.0)
    mu, S = z.mean(0), torch.cov(z.T)
    A = S[:4, 4:] @ torch.linalg.inv(S[4:, 4:])
    q, gal = z[:7, :4], z[7:12, 4:]
    mvn = torch.distributions.MultivariateNormal(mu[:4] + (gal - mu[4:]) @ A.T, S[:4, :4] - A @ S[4:, :4])
    exact = mvn.log_prob(q[:, None, :])                                      # (7, 5)
    got = plugin.scores(q, gal).double()
    assert torch.allclose(got - got[:, :1], exact - exact[:, :1], atol=1e-3)
