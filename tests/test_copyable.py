"""diffgap.py as someone who copies or installs it meets it: a foreign `kernels` module is
ignored, importing the project changes no environment variable, and its defaults are the run's."""
import os
import shutil
import subprocess
import sys
import textwrap

import diffgap as dg
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_copied_alone_beside_a_foreign_kernels_module_it_trains_and_samples_with_torch(tmp_path):
    shutil.copy(os.path.join(ROOT, "diffgap.py"), tmp_path)
    (tmp_path / "kernels").mkdir()   # what Hugging Face's `kernels` distribution looks like from here
    (tmp_path / "kernels" / "__init__.py").write_text("def get_kernel(repo_id):\n    raise RuntimeError('hub')\n")
    script = textwrap.dedent("""
        import torch, diffgap
        assert diffgap._fused_step is None, diffgap._fused_step    # the foreign module is not taken
        cfg = diffgap.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1)
        model = diffgap.DiffGAP(cfg)
        a = torch.nn.functional.normalize(torch.randn(32, 8), dim=-1)
        b = a + 0.01 * torch.randn(32, 8)
        steps = list(diffgap.train_steps(model, a, b, diffgap.make_optimizer(model), 3, 8))
        out = model.sample(b[:2], 0, steps=2)
        diffgap.KERNELS = "triton"
        try:
            model.sample(b[:2], 0, steps=2)
        except ValueError as e:
            print("refused:", e)
        print("ok", steps[-1]["step"], tuple(out.shape))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip().splitlines()
    assert out[0].startswith("refused: KERNELS = 'triton'") and "kernels/" in out[0]
    assert out[1] == "ok 3 (2, 8)"


def test_importing_the_project_changes_no_environment_variable():
    script = ("import os; before = dict(os.environ); import diffgap, diffgap_eval, kernels, embed_cache; "
              "assert diffgap._fused_step is kernels.fused_linear_temb_silu, 'the project kernels are taken'; "
              "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_library_defaults_are_what_train_py_trains():
    args = train.parse_args([])
    train.settle_run_options(args, None)
    cfg = dg.DiffGAPConfig()
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=8, dim_b=8, hidden=16, inner=8, depth=1))
    assert dg.make_optimizer(model).defaults["lr"] == args.lr == 1e-3
    assert all(getattr(cfg, k) == getattr(args, k) for k in train.MODEL_OPTIONS)
    assert set(train.MODEL_OPTIONS) | {"dim_a", "dim_b", "hidden", "inner", "depth", "time_dim", "timesteps"} == \
        set(vars(cfg))   # every trainable setting is an option
    assert cfg.switch_every == 500    # a copied 3,000-step run trains both directions
