"""GPU readiness without a GPU: every kernel compiles for sm_80 and sm_90 at the configs its launcher picks,
without spills, with IEEE fp32 dots unless torch allows TF32, and tensor cores for fp16/bf16.

The compiler's view (benchmarks/aot.py), which the interpreter tests cannot see. ~45 s on 2 cores.
"""
import os
import sys

import pytest
import torch

import kernels

if kernels.fused_mlp is None:
    pytest.skip("triton is not installed", allow_module_level=True)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import aot  # noqa: E402

fused_mlp, topk = kernels.fused_mlp, kernels.topk

pytestmark = pytest.mark.skipif(aot.backend_missing() is not None,
                                reason=f"Triton's NVIDIA backend is not usable here: {aot.backend_missing()}")


@pytest.fixture(scope="module")
def rows():
    return aot.compile_all()


def test_every_kernel_compiles_for_both_archs_and_dtypes(rows):
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    assert seen == {(k, d, a) for k in ("cosine_topk", "fused_fwd", "fused_bwd")
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
    """Compiled in a child that allows TF32 the way current torch documents it; every way of setting the
    flags is covered by tests/test_kernels.py, each in a fresh process."""
    rows = aot.compile_all(archs=(90,), dtypes=("float32",), allow_tf32=True)
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
    """The configs benchmarks/aot.py compiles are the ones the launchers pass (no drift)."""
    recs = {name: Recorder() for name in ("_cosine_topk_kernel", "_fused_fwd_kernel", "_fused_bwd_kernel")}
    for name, rec in recs.items():
        monkeypatch.setattr(topk if "topk" in name else fused_mlp, name, rec)
    monkeypatch.setattr(topk, "_merge", lambda v, i, k: (v, i))
    topk.cosine_topk_triton(torch.randn(40, 24), torch.randn(300, 24), 7)
    assert recs["_cosine_topk_kernel"].kwargs == topk.topk_config(40, 24, 7, torch.float32)
    x, w, b, t = (torch.randn(*s, requires_grad=True) for s in ((64, 512), (224, 512), (224,), (64, 224)))
    fused_mlp.FusedLinearTembSiLU.apply(x, w, b, t).sum().backward()
    fwd, bwd = fused_mlp.fused_config(64, 224, 512, torch.float32)
    assert recs["_fused_fwd_kernel"].kwargs == dict(fwd, STORE_Z=True) and recs["_fused_bwd_kernel"].kwargs == bwd


def test_every_config_gives_tl_dot_tiles_of_16_or_more():
    """tl.dot needs every tile dimension >= 16 on a GPU: a batch of 5 or a dimension of 5 still gets 16."""
    for M, N, K in ((5, 7, 3), (1, 1, 1), (64, 224, 512)):
        for interpret in (False, True):
            fwd, bwd = fused_mlp.fused_config(M, N, K, torch.float16, interpret=interpret)
            c = topk.topk_config(M, K, 3, torch.float16, interpret=interpret)
            assert min(fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["BLOCK_K"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"]) >= 16
            assert (bwd["BLOCK_M"], bwd["BLOCK_N"]) == (fwd["BLOCK_M"], fwd["BLOCK_N"])
