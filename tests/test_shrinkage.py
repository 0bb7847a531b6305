"""The translation shrunk toward its condition (DiffGAP.toward_condition, lam fitted on validation)."""
import pytest
import torch
import torch.nn.functional as F

import diffgap as dg
import diffgap_eval as ev
import embed_cache
from test_score_choice import TINY, run, trained_model


def small_model(dims=(8, 8)) -> dg.DiffGAP:
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=dims[0], dim_b=dims[1], hidden=16, inner=8, time_dim=8)).double().eval()
    model.fit_stats(torch.randn(200, dims[0], dtype=torch.float64) + 1, torch.randn(200, dims[1], dtype=torch.float64) - 1)
    return model


def test_toward_condition_runs_from_the_shifted_condition_to_the_translation():
    """lam = 1: the translation (unit); lam = 0: (q - mean_B) scale_B / scale_A + mean_A, unit; between: the
    straight line in diffusion coordinates."""
    model = small_model()
    q, x = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1), torch.randn(5, 8, dtype=torch.float64)
    (mean_a, scale_a), (mean_b, scale_b) = model._stats(0), model._stats(1)
    assert torch.allclose(model.toward_condition(x, q, 0, 1.0), F.normalize(x, dim=-1))
    shifted = F.normalize((q - mean_b) * scale_b / scale_a + mean_a, dim=-1)
    assert torch.allclose(model.toward_condition(x, q, 0, 0.0), shifted)
    mid = 0.5 * (model.to_diffusion(q, 1) + model.to_diffusion(x, 0))
    assert torch.allclose(model.toward_condition(x, q, 0, 0.5), model.from_diffusion(mid, 0))


def test_translate_shrinks_by_the_fitted_lam_of_its_direction():
    model = small_model()
    model.lam.copy_(torch.tensor([0.25, 1.0]))
    q = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    gen = lambda: torch.Generator().manual_seed(3)
    mean = model.translate(q, 0, 4, generator=gen(), lam=1.0)
    assert torch.allclose(model.translate(q, 0, 4, generator=gen()), model.toward_condition(mean, q, 0, 0.25))
    assert torch.equal(model.translate(q, 1, 4, generator=gen()), model.translate(q, 1, 4, generator=gen(), lam=1.0))


def test_fit_shrinkage_breaks_a_tie_toward_the_paper_translation_and_skips_unequal_dims():
    """One gallery item: every lam ranks it first, so lam stays 1; with D_A != D_B there is nothing to fit."""
    model = small_model()
    split = embed_cache.Split(a=F.normalize(torch.randn(1, 8), dim=-1).double(),
                              b=F.normalize(torch.randn(3, 8), dim=-1).double(), b_to_a=torch.zeros(3, dtype=torch.long))
    ev.fit_shrinkage(model, split, 2)
    assert model.lam.tolist() == [1.0, 1.0]
    unequal = small_model((8, 6))   # no shared space to shrink toward: the translations as they are, lam 1
    split = embed_cache.Split(a=torch.randn(2, 8).double(), b=torch.randn(2, 6).double(), b_to_a=torch.arange(2))
    out = ev.fit_shrinkage(unequal, split, 2, seed=4)
    assert unequal.lam.tolist() == [1.0, 1.0] and all(torch.equal(out[k], x) for k, x in
                                                       ev.translate_split(unequal, split, 2, seed=4).items())


def test_a_checkpoint_from_before_the_shrinkage_loads_as_the_paper_translation(tmp_path):
    model = small_model().float()
    path = str(tmp_path / "old.pt")
    ev.save_checkpoint(path, model)
    state = torch.load(path)
    del state["model"]["lam"], state["config"]["shrink"]
    torch.save(state, path)
    loaded, _ = ev.load_checkpoint(path)
    assert loaded.lam.tolist() == [1.0, 1.0] and loaded.config.shrink is False


def test_train_fits_lam_into_the_checkpoint_and_no_shrink_keeps_the_paper_translation(tmp_path):
    out = run("train.py", "--data", TINY, "--epochs", "2", "--num-samples", "2", "--no-eval", cwd=tmp_path).stdout
    assert "translation shrinkage fitted on validation and saved" in out
    fitted, _ = ev.load_checkpoint(str(tmp_path / "runs" / "audio-video" / "ckpt.pt"))
    assert set(fitted.lam.tolist()) <= set(ev.SHRINK_GRID)
    out = run("train.py", "--data", TINY, "--epochs", "2", "--no-shrink", "--no-eval", "--out", "p", cwd=tmp_path).stdout
    paper, _ = ev.load_checkpoint(str(tmp_path / "p" / "audio-video" / "ckpt.pt"))
    assert "shrinkage" not in out and paper.lam.tolist() == [1.0, 1.0] and paper.config.shrink is False
    res = run("train.py", "--resume", "--no-shrink", "--epochs", "3", cwd=tmp_path, check=False)
    assert res.returncode == 2 and "--no-shrink False differs from the checkpoint's True" in res.stderr


@pytest.mark.parametrize("pair", ["audio-video", "audio-text"])
def test_on_a_small_aligned_space_the_diffgap_score_is_not_below_contrastive(pair):
    """The default model trained on few aligned pairs: its diffgap R@1 is not below contrastive's beyond the
    paired 95% interval of the gain, where the unshrunk translation (the paper's) loses beyond it."""
    data = embed_cache.load("synthetic:preset=aligned,n_train=250,n_val=200,n_test=300", pair)
    model = trained_model(data, 600)
    val, test = data.splits["val"], data.splits["test"]
    kw = dict(num_samples=8, guidance=ev.RANK_GUIDANCE)
    ev.fit_shrinkage(model, val, **kw)
    shrunk, unshrunk = ev.translate_split(model, test, **kw), ev.translate_split(model, test, lam=1.0, **kw)
    for d in (0, 1):
        new = ev.split_scores(test, d, shrunk, ["contrastive", "diffgap"])["diffgap"]
        paper = ev.split_scores(test, d, unshrunk, ["contrastive", "diffgap"])["diffgap"]
        assert new["gain hi"] >= 0 and paper["gain hi"] < 0, (d, model.lam.tolist(), new["gain"], paper["gain"])
