"""GPU readiness without a GPU: every kernel compiles for sm_80 and sm_90 at the configs its launcher
picks, without spills, with IEEE fp32 dots unless torch allows TF32, and tensor cores for fp16/bf16.

The compiler's view (kernels/aot.py), which the interpreter tests cannot see. ~45 s on 2 cores.
"""
import importlib

import pytest
import torch

import kernels
from kernels import aot

# the modules, not the functions of the same name that the package exports
topk_mod, fused_mlp = (importlib.import_module(f"kernels.{m}") for m in ("cosine_topk", "fused_mlp"))

pytestmark = pytest.mark.skipif(aot.backend_missing() is not None,
                                reason=f"Triton's NVIDIA backend is not usable here: {aot.backend_missing()}")


@pytest.fixture(scope="module")
def rows():
    return aot.compile_all()


def test_every_kernel_compiles_for_both_archs_and_dtypes(rows):
    kernels_seen = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    assert kernels_seen == {(k, d, a) for k in ("cosine_topk", "fused_fwd", "fused_bwd")
                            for d in ("float32", "float16", "bfloat16") for a in (80, 90)}
    assert len(rows) == 2 * len(aot.cases())
    assert all(r["registers"] > 0 and r["blocks_per_sm"] >= 1 for r in rows)


def test_no_config_spills_or_sits_at_the_register_cap(rows):
    bad = [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']}: {r['registers']} regs, {r['spill_bytes']} B stack"
           for r in rows if r["spill_bytes"] > 0 or r["registers"] >= 255]
    assert not bad, bad


def test_fp32_dots_are_ieee_by_default_and_fp16_bf16_use_tensor_cores(rows):
    assert kernels.fp32_dot_precision() == "ieee"   # this process never allows TF32
    assert not any(r["tf32"] for r in rows)
    dots = [r for r in rows if r["kernel"] in ("cosine_topk", "fused_fwd")]
    assert all(r["tensor_core_ops"] == 0 for r in dots if r["dtype"] == "float32")
    assert all(r["tensor_core_ops"] > 0 for r in dots if r["dtype"] != "float32")


def test_fp32_dots_follow_torch_when_it_allows_tf32():
    """Compiled in a child that allows TF32 the way current torch documents it (aot.set_fp32_matmul_precision);
    every way of setting the flags is covered by tests/test_kernels.py, each in a fresh process."""
    rows = aot.compile_all(archs=(90,), dtypes=(torch.float32,), allow_tf32=True)
    assert all(r["tf32"] and r["tensor_core_ops"] > 0 for r in rows if r["kernel"] != "fused_bwd")


class Recorder:
    """Stands in for a @triton.jit kernel: records the launch's keyword arguments."""

    def __init__(self):
        self.kwargs = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs = kwargs
        return launch


def test_launchers_use_the_configs_that_are_compiled(monkeypatch):
    """The configs kernels/aot.py compiles are the ones the launchers pass (no drift)."""
    rec = Recorder()
    monkeypatch.setattr(topk_mod, "_cosine_topk_kernel", rec)
    q, g = torch.randn(40, 24), torch.randn(300, 24)
    big_k = topk_mod.cosine_topk_triton(q, g, topk_mod.K_MAX + 1)      # beyond K_MAX: the torch path
    assert rec.kwargs is None and torch.equal(big_k[1], topk_mod.cosine_topk_reference(q, g, topk_mod.K_MAX + 1)[1])
    monkeypatch.setattr(topk_mod, "_merge", lambda v, i, k: (v, i))
    topk_mod.cosine_topk_triton(q, g, 7)
    assert rec.kwargs == topk_mod.topk_config(40, 24, 7, torch.float32)

    rec = Recorder()
    monkeypatch.setattr(fused_mlp, "_fused_fwd_kernel", rec)
    x, w, b, t = torch.randn(64, 512), torch.randn(224, 512), torch.randn(224), torch.randn(64, 224)
    fused_mlp.fused_forward(x, w, b, t, store_z=True)
    assert rec.kwargs == dict(fused_mlp.fused_config(64, 224, 512, torch.float32), TEMB_ROWS=True, STORE_Z=True)
