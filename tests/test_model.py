"""The model: scaling into diffusion space, shapes, parameter budget, checkpoints, standalone use."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import diffgap as dg
import diffgap_eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_parameter_count_matches_the_paper():
    n = dg.DiffGAP(dg.DiffGAPConfig()).num_params()
    assert abs(n - 1.35e6) / 1.35e6 < 0.15   # the paper's ~5.4 MB of fp32 parameters


def test_embedding_scaling_round_trip_and_unit_variance():
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=32, dim_b=32, ema_decay=0))
    e = torch.nn.functional.normalize(torch.randn(4000, 32) + 1.5, dim=-1)
    before = e.clone()
    model.fit_stats(e, e)
    x = model.to_diffusion(e, 0)
    assert torch.equal(e, before)                               # never in place
    assert x.var(0).mean().item() == pytest.approx(1.0, rel=0.02)
    assert x.mean(0).abs().max().item() < 0.05
    assert torch.allclose(model.from_diffusion(x, 0), e, atol=1e-5)
    # with zero means (before fit_stats) it is the plain sqrt(D) scaling
    plain = dg.DiffGAP(dg.DiffGAPConfig(dim_a=32, dim_b=32))
    assert torch.allclose(plain.to_diffusion(e, 0), e * 32 ** 0.5, atol=1e-5)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("direction", [0, 1])
def test_loss_is_the_mse_of_the_objective_at_x_t(objective, direction):
    """x0 and the condition in diffusion space, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al.
    eq. 4), the loss the MSE of the prediction against eps, x0 or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=12, hidden=16, inner=8, depth=1, time_dim=8,
                                        objective=objective)).double()
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0, 0.3)
    model.fit_stats(torch.randn(30, 8, dtype=torch.float64) + 1, torch.randn(30, 12, dtype=torch.float64) - 1)
    tgt, src = (0, 1) if direction == 0 else (1, 0)
    target, cond = torch.randn(5, (8, 12)[tgt], dtype=torch.float64), torch.randn(5, (8, 12)[src], dtype=torch.float64)
    t, eps = torch.tensor([0, 3, 500, 998, 999]), torch.randn(5, (8, 12)[tgt], dtype=torch.float64)
    drop = torch.tensor([False, True, False, False, True])
    x0, c = model.to_diffusion(target, tgt), model.to_diffusion(cond, src)
    ab = model.alpha_bar.double()[t][:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    want = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[objective]
    pred = model.net(x_t, t, model.net.condition(c, direction, drop), direction)
    assert torch.allclose(model.loss(target, cond, direction, t, eps, drop), ((pred - want) ** 2).mean(), rtol=1e-6)
    assert not torch.allclose(pred, model.net(x_t, t, model.net.condition(c, direction), direction))   # the mask is used


def test_kernels_setting_routes_the_hidden_step(monkeypatch):
    """KERNELS: "triton" always calls the kernel (strict), "torch" never, "auto" only for CUDA
    tensors (so never here); anything else, or "triton" without kernels/, is refused."""
    h, w, b, temb = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4), torch.randn(3, 4)
    want = torch.nn.functional.silu(h @ w.T + b + temb)
    calls = []

    def kernel(*args, strict):   # stands for kernels.fused_linear_temb_silu: records the call instead of launching
        calls.append((args, strict))
        return "kernel"
    monkeypatch.setattr(dg, "_fused_step", kernel)
    monkeypatch.setattr(dg, "KERNELS", "triton")
    assert dg.hidden_step(h, w, b, temb) == "kernel"
    assert len(calls) == 1 and len(calls[0][0]) == 4 and calls[0][1] is True
    assert all(x is y for x, y in zip(calls[0][0], (h, w, b, temb)))
    for mode in ("auto", "torch"):
        monkeypatch.setattr(dg, "KERNELS", mode)
        assert torch.allclose(dg.hidden_step(h, w, b, temb), want) and len(calls) == 1
    monkeypatch.setattr(dg, "KERNELS", "bogus")
    with pytest.raises(ValueError, match="KERNELS = 'bogus'"):
        dg.hidden_step(h, w, b, temb)
    monkeypatch.setattr(dg, "_fused_step", None)         # kernels/ not importable (diffgap.py copied alone)
    for mode in ("auto", "torch"):
        monkeypatch.setattr(dg, "KERNELS", mode)
        assert torch.allclose(dg.hidden_step(h, w, b, temb), want)
    monkeypatch.setattr(dg, "KERNELS", "triton")
    with pytest.raises(ValueError, match="KERNELS = 'triton' needs the kernels/ package"):
        dg.hidden_step(h, w, b, temb)


def test_the_optimiser_is_fused_adam_at_lr_1e_3():
    opt = dg.make_optimizer(dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1)))
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 1e-3 and opt.defaults["fused"] is True
    assert dg.make_optimizer(dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8)), 0.5).defaults["lr"] == 0.5


def test_adapters_when_dims_differ():
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=16, dim_b=24, hidden=32, inner=16, depth=1))
    assert len(model.net.x_in) == 2
    t = torch.randint(0, 1000, (5,))
    loss = model.loss(torch.randn(5, 16), torch.randn(5, 24), 0, t, torch.randn(5, 16)) + \
        model.loss(torch.randn(5, 24), torch.randn(5, 16), 1, t, torch.randn(5, 24))
    loss.backward()
    assert torch.isfinite(loss)
    shared = dg.DiffGAP(dg.DiffGAPConfig(dim_a=16, dim_b=16, hidden=32, inner=16, depth=1))
    assert len(shared.net.x_in) == 1


@pytest.mark.parametrize("direction", [0, 1])
def test_the_denoiser_computes_its_documented_function(direction):
    """The network, written out in plain ops from its docstrings: a changed activation, sign or layer fails."""
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=6, dim_b=10, hidden=12, inner=8, depth=2, time_dim=4))
    net = model.net
    for block in net.blocks:   # blocks start as the identity (fc2 = 0): give them something to compute
        torch.nn.init.normal_(block.fc2.weight)
        torch.nn.init.normal_(block.fc2.bias)
    dims = (6, 10)
    x_t, cond = torch.randn(5, dims[direction]), torch.randn(5, dims[1 - direction])
    t, drop = torch.tensor([0, 1, 250, 998, 999]), torch.tensor([False, True, False, False, True])
    lin, silu = torch.nn.functional.linear, torch.nn.functional.silu

    def ln(m, h):
        return torch.nn.functional.layer_norm(h, (h.shape[-1],), m.weight, m.bias, m.eps)

    freqs = 10000.0 ** (-torch.arange(2.0) / 2)                              # time_dim / 2 frequencies
    features = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    c = lin(cond, net.c_in[1 - direction].weight, net.c_in[1 - direction].bias)
    c = torch.where(drop[:, None], net.null_cond, c)
    emb = lin(silu(lin(features, net.time_mlp[0].weight, net.time_mlp[0].bias)),
              net.time_mlp[2].weight, net.time_mlp[2].bias)
    emb = emb + net.dir_emb.weight[direction] + lin(silu(c), net.cond_mlp[1].weight, net.cond_mlp[1].bias)
    h = lin(x_t, net.x_in[direction].weight, net.x_in[direction].bias) + c
    for b in net.blocks:
        h = h + lin(silu(lin(ln(b.norm, h), b.fc1.weight, b.fc1.bias) + emb), b.fc2.weight, b.fc2.bias)
    expected = lin(ln(net.norm_out, h), net.out[direction].weight, net.out[direction].bias)
    with torch.no_grad():
        got = net(x_t, t, net.condition(cond, direction, drop), direction)
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_direction_embedding_can_be_switched_off():
    on = dg.DiffGAP(dg.DiffGAPConfig(hidden=32, inner=16, depth=1, dim_a=8, dim_b=8))
    off = dg.DiffGAP(dg.DiffGAPConfig(hidden=32, inner=16, depth=1, dim_a=8, dim_b=8, direction_embedding=False))
    assert on.net.dir_emb is not None and off.net.dir_emb is None
    assert on.num_params() - off.num_params() == 2 * 16


def test_the_state_dict_holds_weights_only_and_ema_only_when_on():
    """Checkpoints hold the learned weights, the EMA copy when ema_decay > 0, and the embedding
    means; the timestep features are recomputed (a checkpoint without them must keep loading)."""
    on = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1, ema_decay=0.5)).state_dict()
    off = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1, ema_decay=0.0))
    assert off.ema is None and not any(k.startswith("ema.") for k in off.state_dict())
    assert {k[4:] for k in on if k.startswith("ema.")} == {k[4:] for k in on if k.startswith("net.")}
    assert not any("time_features" in k for k in on)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1, objective="x0"))
    model.fit_stats(torch.randn(20, 8) + 1, torch.randn(20, 8))
    opt = dg.make_optimizer(model)
    for _ in dg.train_steps(model, torch.randn(16, 8), torch.randn(16, 8), opt, 3, 4):
        pass
    path = str(tmp_path / "ckpt.pt")
    ev.save_checkpoint(path, model, optimizer=opt.state_dict(), step=3, run={"data": "synthetic"},
                       rng={"torch": torch.get_rng_state()})
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["config"]["objective"] == "x0" and raw["run"] == {"data": "synthetic"}
    loaded, ckpt = ev.load_checkpoint(path)
    cond = torch.randn(4, 8)
    same = [m.sample(cond, 1, steps=5, generator=torch.Generator().manual_seed(0)) for m in (model, loaded)]
    assert torch.equal(same[0], same[1])
    assert os.listdir(tmp_path) == ["ckpt.pt"]   # no temp file left behind


def test_a_pickle_or_junk_checkpoint_is_one_line_without_warnings(tmp_path):
    import pickle
    import warnings
    path = str(tmp_path / "ckpt.pt")
    for write in (lambda f: pickle.dump({"config": {}, "model": {}}, f, protocol=4), lambda f: f.write(b"junk" * 10)):
        with open(path, "wb") as f:
            write(f)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"ckpt\.pt: not a (usable )?diffgap checkpoint") as e:
                ev.load_checkpoint(path)
        assert "False" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "missing"])
def test_bad_checkpoint_is_reported(tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    ev.save_checkpoint(path, dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1)))
    if damage in ("truncate", "empty"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2 if damage == "truncate" else 0)
        with pytest.raises(ValueError, match=r"ckpt\.pt: not a usable diffgap checkpoint \(truncated or corrupt, "
                           + ("0 bytes" if damage == "empty" else r"[\d,]+ bytes")):
            ev.load_checkpoint(path)
    elif damage == "garbage":
        torch.save({"config": {"dim_a": 8}, "model": {"nope": torch.zeros(1)}}, path)
    else:
        os.remove(path)
    err = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(err, match=r"ckpt\.pt"):
        ev.load_checkpoint(path)


def test_diffgap_py_works_alone(tmp_path):
    """Copied alone, with numpy, tqdm and the project's packages unimportable, it still trains."""
    shutil.copy(os.path.join(ROOT, "diffgap.py"), tmp_path)
    script = textwrap.dedent("""
        import sys
        BLOCKED = {"numpy", "tqdm", "embed_cache", "kernels", "triton", "soundfile", "scipy"}
        for name in BLOCKED:
            sys.modules[name] = None  # "import name" now raises ModuleNotFoundError
        import torch, diffgap
        for name in BLOCKED:
            assert sys.modules[name] is None, name
        cfg = diffgap.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1)
        model = diffgap.DiffGAP(cfg)
        a, b = torch.randn(16, 8), torch.randn(16, 8)
        stats = list(diffgap.train_steps(model, a, b, diffgap.make_optimizer(model), 1, 8))
        out = model.sample(b[:3], 0, steps=5)
        print("ok", stats[0]["step"], tuple(out.shape))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok 1 (3, 8)")


@pytest.mark.parametrize("field,value,words", [
    ("switch_every", 0, "is 0; expected an integer >= 1"), ("depth", 1.0, "is 1.0; expected an integer"),
    ("dim_a", True, "is True; expected an integer"), ("time_dim", 9, "is 9; expected an even integer >= 2"),
    ("timesteps", -5, "is -5; expected an integer >= 1"), ("schedule", "sigmoid", "expected 'cosine' or 'linear'"),
    ("objective", "score", "expected 'eps', 'x0' or 'v'"), ("p_uncond", 1.0, "is 1.0; expected a number in [0, 1)"),
    ("ema_decay", -0.1, "expected a number in [0, 1)"), ("p_uncond", "0.1", "is '0.1'; expected a number"),
    ("direction_embedding", "yes", "is 'yes'; expected True or False"), ("inner", 0, "expected an integer >= 1"),
])
def test_a_config_that_cannot_train_is_refused(field, value, words):
    """DiffGAPConfig checks its own values, so a copied diffgap.py refuses them too (switch_every 0
    would otherwise end in ZeroDivisionError at the first step)."""
    with pytest.raises(ValueError, match=rf"^DiffGAPConfig\.{field} is") as e:
        dg.DiffGAPConfig(**{field: value})
    assert words in str(e.value)


def test_every_config_value_that_can_train_is_accepted():
    for schedule in ("cosine", "linear"):
        for objective in ("eps", "x0", "v"):
            dg.DiffGAPConfig(schedule=schedule, objective=objective)
    dg.DiffGAPConfig(p_uncond=0.0, ema_decay=0.0, time_dim=2, timesteps=1, switch_every=1, depth=1,
                     direction_embedding=False)
    dg.DiffGAPConfig(p_uncond=0, ema_decay=0.5)
    dg.DiffGAPConfig(p_uncond=np.float64(0.1), ema_decay=np.float32(0.99))   # numpy's scalars, as read from arrays
