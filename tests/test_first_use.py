"""The first-use check (kernels/__init__.py): a kernel's first result per (kernel, dtype, device, fp32 dot
precision) in a process is held to torch; a wrong result or a compile / launch error gives one warning and
the torch path, or an error when the kernels were asked for explicitly (strict).

On a CPU the kernels run under Triton's interpreter; faults are injected by standing in for the
@triton.jit kernels: run the real one, then corrupt an output, or raise instead of launching.
"""
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import diffgap as dg

kernels = pytest.importorskip("kernels")
from kernels import KernelCheckError, KernelFallbackWarning  # noqa: E402

fused_mlp, topk = kernels.fused_mlp, kernels.topk
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WHERE = f"{DEVICE} ({torch.cuda.get_device_name(DEVICE) if DEVICE.type == 'cuda' else 'Triton interpreter'})"
needs_triton = pytest.mark.skipif(fused_mlp is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def fresh_checks():
    """Every test starts, and leaves, a process in which no kernel has been checked yet."""
    kernels._verdicts.clear(), kernels._warned.clear()
    yield
    kernels._verdicts.clear(), kernels._warned.clear()


class Fault:
    """Stands in for a @triton.jit kernel: counts launches; runs the real kernel and then applies
    `corrupt` to its positional argument `arg` (an output), or raises `error` instead."""

    def __init__(self, kernel, arg=None, corrupt=None, error=None):
        self.kernel, self.arg, self.corrupt, self.error, self.launches = kernel, arg, corrupt, error, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            if self.error is not None:
                raise self.error
            out = self.kernel[grid](*args, **kwargs)
            if self.corrupt is not None:
                self.corrupt(args[self.arg])
            return out
        return run


def inject(monkeypatch, which, **fault):
    mod, attr = {"fused_fwd": (fused_mlp, "_fused_fwd_kernel"), "fused_bwd": (fused_mlp, "_fused_bwd_kernel"),
                 "cosine_topk": (topk, "_cosine_topk_kernel")}[which]
    f = Fault(getattr(mod, attr), **fault)
    monkeypatch.setattr(mod, attr, f)
    return f


def fused_inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(70, 48, generator=g), torch.randn(130, 48, generator=g) / 7
    b, t = torch.randn(130, generator=g), torch.randn(70, 130, generator=g)
    return [a.to(DEVICE, dtype).requires_grad_() for a in (x, w, b, t)]


def fused_run(fn, inputs):
    """fn's output and the gradients of all four inputs for a fixed upstream gradient."""
    ins = [a.detach().clone().requires_grad_() for a in inputs]
    y = fn(*ins)
    y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape).to(y.dtype))
    return [y.detach()] + [a.grad for a in ins]


def topk_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 24, generator=g).to(DEVICE), torch.randn(300, 24, generator=g).to(DEVICE)


# what each public function computes on its torch path, and through the kernels
FUSED_TORCH = lambda inputs: fused_run(kernels.fused_linear_temb_silu_reference, inputs)
TOPK_TORCH = lambda q, g: kernels.cosine_topk_torch(q, g, 10)
TOPK_API = lambda q, g, **strict: kernels.cosine_topk(q, g, 10, backend="triton", **strict)   # strict's default unless given


@needs_triton
def test_a_correct_kernel_passes_and_changes_no_result():
    inputs = fused_inputs()
    cpu_rng, cuda_rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # sampling's context, and mixed precision: the check still runs its backward and its float64 reference
        with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y_inf = kernels.fused_linear_temb_silu(*(a.detach() for a in inputs))
        api = fused_run(kernels.fused_linear_temb_silu, inputs)
        q, g = topk_inputs()
        top = TOPK_API(q, g)
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    if cuda_rng is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng))
    raw = fused_run(lambda *a: fused_mlp.FusedLinearTembSiLU.apply(*a, None), inputs)
    assert all(torch.equal(a, b) for a, b in zip(api, raw))          # bit for bit: the kernel's results
    assert torch.equal(y_inf, raw[0])
    raw_top = topk.cosine_topk_triton(q, g, 10)
    assert torch.equal(top[0], raw_top[0]) and torch.equal(top[1], raw_top[1])
    assert {k[0] for k in kernels._verdicts} == {"fused_linear_temb_silu", "cosine_topk"}
    assert all(v is None for v in kernels._verdicts.values())       # both trusted
    # every tensor the checks compare, within its tolerance, in every dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        errors = fused_mlp.self_test(dtype, DEVICE)
        assert set(errors) == {"y", "dx", "dW", "db", "dtemb", "y without grad"} and all(e <= t for e, t in errors.values())
        assert topk.self_test(dtype, DEVICE) == {"values": (pytest.approx(0, abs=1e-6), 1e-5), "indices": (0.0, 0.0)}


@needs_triton
def test_the_check_runs_once_per_process_and_key(monkeypatch):
    runs = []
    for mod in (fused_mlp, topk):
        real = mod.self_test
        monkeypatch.setattr(mod, "self_test", lambda dtype, device, real=real, mod=mod: runs.append((mod, dtype))
                            or real(dtype, device))
    x, w, b, t = (a.detach() for a in fused_inputs())
    for _ in range(3):
        kernels.fused_linear_temb_silu(x, w, b, t)
    kernels.fused_linear_temb_silu(x.half(), w.half(), b.half(), t.half())   # another dtype: another key
    q, g = topk_inputs()
    TOPK_API(q, g), TOPK_API(q, g)
    kernels.cosine_topk(q, g, 40, backend="triton")                          # k > K_MAX: torch, nothing to check
    kernels.cosine_topk(q, g, 10, backend="torch")
    assert runs == [(fused_mlp, torch.float32), (fused_mlp, torch.float16), (topk, torch.float32)]
    monkeypatch.setattr(kernels, "fp32_dot_precision", lambda: "tf32")     # another dot precision: another key
    kernels.fused_linear_temb_silu(x, w, b, t)
    assert runs[-1] == (fused_mlp, torch.float32) and len(runs) == 4 and len(kernels._verdicts) == 4


WRONG = {   # kernel, output argument, corruption, the tensor the message must name: each a plausible miscompile
    "fused forward": ("fused_fwd", 4, lambda y: y.add_(0.5), "y"),
    "fused backward": ("fused_bwd", 2, lambda dz: dz.mul_(1.5), "dW"),     # dz: dx, dW, dtemb go wrong, db not
    "top-k": ("cosine_topk", 5, lambda idx: idx.add_(1), "indices"),
    "top-k values": ("cosine_topk", 4, lambda v: v.add_(1e-3), "values"),  # values only, indices right
}


@needs_triton
@pytest.mark.parametrize("case", list(WRONG))
@pytest.mark.parametrize("fault", ["wrong result", "launch error"])
def test_a_failing_kernel_warns_once_and_the_torch_path_takes_over(case, fault, monkeypatch):
    which, arg, corrupt, tensor = WRONG[case]
    f = inject(monkeypatch, which, **(dict(arg=arg, corrupt=corrupt) if fault == "wrong result" else
                                      dict(error=RuntimeError("injected launch failure"))))
    if which == "cosine_topk":
        q, g = topk_inputs()
        call, want = (lambda: TOPK_API(q, g)), TOPK_TORCH(q, g)
    else:
        inputs = fused_inputs()
        call, want = (lambda: fused_run(kernels.fused_linear_temb_silu, inputs)), FUSED_TORCH(inputs)
    with pytest.warns(KernelFallbackWarning) as caught:
        got = call()
    assert len(caught) == 1 and caught[0].filename == __file__   # it points at the line that called
    assert open(__file__).read().splitlines()[caught[0].lineno - 1].strip().startswith(("TOPK_API =", "y = fn("))
    msg = str(caught[0].message)
    kernel = "cosine_topk" if which == "cosine_topk" else "fused_linear_temb_silu"
    assert msg.startswith(f"{kernel} (float32, {WHERE}, Triton {kernels.triton.__version__})"), msg
    if fault == "wrong result":
        assert f"max error in {tensor} " in msg or f", {tensor} " in msg, msg
    else:
        assert "RuntimeError: injected launch failure" in msg, msg
    assert all(torch.equal(a, b) for a, b in zip(got, want))     # exactly the torch path's results
    launched = f.launches
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # no second warning
        again = call()
    assert all(torch.equal(a, b) for a, b in zip(again, want)) and f.launches == launched   # kernel not used again


@needs_triton
def test_the_message_names_every_tensor_beyond_tolerance_and_no_other(monkeypatch):
    """dz corrupted after the kernel: dx, dW and dtemb (= dz) are wrong, y and db (from the kernel's own
    column sums) are right."""
    inject(monkeypatch, "fused_bwd", arg=2, corrupt=lambda dz: dz.mul_(1.5))
    with pytest.warns(KernelFallbackWarning) as caught:
        kernels.fused_linear_temb_silu(*fused_inputs())
    msg = str(caught[0].message)
    named = re.findall(r"(\w+) ([\d.e+-]+) \(tolerance ([\d.e+-]+)\)", msg.split("max error in ")[1])
    assert [name for name, _, _ in named] == ["dx", "dW", "dtemb"], msg
    assert all(float(err) > float(tol) >= 1e-5 for _, err, tol in named), msg


@needs_triton
@pytest.mark.parametrize("fault", ["wrong result", "launch error"])
def test_kernels_asked_for_explicitly_raise(fault, monkeypatch):
    for which, arg, corrupt, _ in (WRONG["fused forward"], WRONG["top-k"]):
        inject(monkeypatch, which, **(dict(arg=arg, corrupt=corrupt) if fault == "wrong result" else
                                      dict(error=RuntimeError("injected"))))
    x, w, b, t = fused_inputs()
    q, g = topk_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):    # every call, not only the first
            for call, kernel in ((lambda: kernels.fused_linear_temb_silu(x, w, b, t, strict=True), "fused_linear_temb_silu"),
                                 (lambda: TOPK_API(q, g, strict=True), "cosine_topk")):
                with pytest.raises(KernelCheckError, match=rf"^{kernel} \(float32, .*(max error in|RuntimeError: injected)"):
                    call()
    with pytest.warns(KernelFallbackWarning):   # a later call that allows the fallback still gets its one warning
        kernels.fused_linear_temb_silu(x, w, b, t)


@needs_triton
def test_a_launch_error_after_a_passed_check_falls_back_forward_and_backward(monkeypatch):
    inputs = fused_inputs()
    kernels.fused_linear_temb_silu(*(a.detach() for a in inputs))   # the check passes
    assert list(kernels._verdicts.values()) == [None]
    inject(monkeypatch, "fused_bwd", error=RuntimeError("injected backward failure"))
    with pytest.warns(KernelFallbackWarning, match="^fused_linear_temb_silu .*RuntimeError: injected backward"):
        got = fused_run(kernels.fused_linear_temb_silu, inputs)     # the forward ran the kernel, the backward could not
    want = FUSED_TORCH(inputs)   # got: the kernel's forward, torch's dz; equal within the fp32 tolerance
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, want))
    fwd = inject(monkeypatch, "fused_fwd", error=RuntimeError("never launched"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = fused_run(kernels.fused_linear_temb_silu, inputs)
    assert fwd.launches == 0 and all(torch.equal(a, b) for a, b in zip(later, want))
    with pytest.raises(KernelCheckError, match="injected backward failure"):   # strict: raises on every use
        kernels.fused_linear_temb_silu(*inputs, strict=True)


@needs_triton
def test_a_forward_launch_error_after_a_passed_check_falls_back(monkeypatch):
    inputs = [a.detach() for a in fused_inputs()]
    kernels.fused_linear_temb_silu(*inputs)                                  # the check passes
    inject(monkeypatch, "fused_fwd", error=RuntimeError("injected forward failure"))
    with pytest.warns(KernelFallbackWarning, match="RuntimeError: injected forward failure"):
        got = kernels.fused_linear_temb_silu(*inputs)
    assert torch.equal(got, kernels.fused_linear_temb_silu_reference(*inputs))


@needs_triton
def test_a_top_k_launch_error_after_a_passed_check_falls_back(monkeypatch):
    q, g = topk_inputs()
    want = TOPK_TORCH(q, g)
    v, i = TOPK_API(q, g)                             # the check passes, the kernel answers
    assert torch.equal(i, want[1]) and torch.allclose(v, want[0], atol=1e-5)
    long = RuntimeError("injected top-k failure " + "x" * 400 + "\nsecond line")
    inject(monkeypatch, "cosine_topk", error=long)
    with pytest.warns(KernelFallbackWarning, match="^cosine_topk .*RuntimeError: injected top-k") as caught:
        got = TOPK_API(q, g)
    msg = str(caught[0].message)   # an error's first line, cut at 300 characters
    assert "x" * 277 in msg and "x" * 278 not in msg and "second line" not in msg
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(KernelCheckError, match="injected top-k failure"):
        TOPK_API(q, g, strict=True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_backwards_torch_fallback_accumulates_like_the_kernel(dtype, monkeypatch):
    """FusedLinearTembSiLU.apply without `strict` (autograd passes no keywords): a failing backward launch
    warns once and computes dz in torch, in fp32 for fp32 inputs and fp64 for fp64 ones."""
    inputs = [a.detach().to(dtype) for a in fused_inputs()]
    kernel = fused_run(lambda *a: fused_mlp.FusedLinearTembSiLU.apply(*a), inputs)
    inject(monkeypatch, "fused_bwd", error=RuntimeError("injected backward failure"))
    with pytest.warns(KernelFallbackWarning, match="injected backward failure"):
        got = fused_run(lambda *a: fused_mlp.FusedLinearTembSiLU.apply(*a), inputs)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    assert all(a.dtype == dtype and torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(got, kernel))


@needs_triton
def test_each_dtype_is_checked_at_its_own_tolerance(monkeypatch):
    """TF32 dots loosen fp32's tolerance to fp16's (2e-2), and change no other dtype's; and a forward off by
    1e-3 fails fp32 with IEEE dots but passes with TF32 ones."""
    allowed = {}
    for precision in ("ieee", "tf32"):
        monkeypatch.setattr(fused_mlp, "fp32_dot_precision", lambda: precision)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            allowed[precision, dtype] = {name: tol for name, (_, tol) in fused_mlp.self_test(dtype, DEVICE).items()}
    for dtype, ratio in ((torch.float32, 2e-2 / 1e-5), (torch.float16, 1), (torch.bfloat16, 1)):
        assert all(allowed["tf32", dtype][n] == pytest.approx(ratio * allowed["ieee", dtype][n]) for n in allowed["ieee", dtype])
    base = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}   # times max |ref| where that exceeds 1
    assert all(min(allowed["ieee", d].values()) >= t and allowed["ieee", d]["y"] < 10 * t for d, t in base.items())
    inject(monkeypatch, "fused_fwd", arg=4, corrupt=lambda y: y.add_(1e-3))
    for precision, fails in (("ieee", True), ("tf32", False)):
        monkeypatch.setattr(kernels, "fp32_dot_precision", lambda: precision)   # the key: checked again
        monkeypatch.setattr(fused_mlp, "fp32_dot_precision", lambda: precision)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernels.fused_linear_temb_silu(*(a.detach() for a in fused_inputs()))
        assert len(caught) == fails and (not fails or "max error in y " in str(caught[0].message)), precision


def test_max_error_allows_tol_up_to_magnitude_1_and_relative_beyond():
    ref = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert kernels.max_error(ref + 1.5e-5, ref, 1e-5) == (pytest.approx(1.5e-5), 1e-5)         # fails at 1e-5
    assert kernels.max_error(ref * 100, ref * 100, 1e-5)[1] == pytest.approx(1e-3)             # 100 x tol
    assert kernels.max_error(ref / 10, ref / 10, 1e-5)[1] == 1e-5                               # tol below 1
    assert kernels.max_error(ref * 100 + 0.5, ref * 100, 1e-5, scale=False)[1] == 1e-5
    nan = kernels.max_error(ref[:1], ref, 1e-5)[0]                                             # shapes: NaN
    assert nan != nan and kernels.max_error(ref * float("inf"), ref, 1e-5)[0] != 0
    assert kernels.max_error(torch.empty(0), torch.empty(0), 1e-5) == (0.0, 1e-5)


@needs_triton
def test_diffgap_kernels_triton_raises_and_auto_on_cuda_falls_back(monkeypatch):
    inject(monkeypatch, "fused_fwd", arg=4, corrupt=lambda y: y.add_(0.5))
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=24, dim_b=24, hidden=32, inner=16, depth=2, time_dim=16)).to(DEVICE)
    a, b = torch.randn(16, 24).to(DEVICE), torch.randn(16, 24).to(DEVICE)
    opt = dg.make_optimizer(model, 1e-2)
    monkeypatch.setattr(dg, "KERNELS", "triton")
    with pytest.raises(KernelCheckError, match="^fused_linear_temb_silu .*max error in y "):
        next(dg.train_steps(model, a, b, opt, 1, 16, seed=0))
    if DEVICE.type == "cuda":   # "auto" on CUDA: one warning, then the torch path
        monkeypatch.setattr(dg, "KERNELS", "auto")
        kernels._verdicts.clear()
        with pytest.warns(KernelFallbackWarning):
            next(dg.train_steps(model, a, b, opt, 1, 16, seed=0))


NO_TRITON = textwrap.dedent("""
    import sys, warnings
    sys.modules["triton"] = None   # "import triton" now raises ImportError, as where it is not installed
    import torch, kernels, diffgap, diffgap_eval   # the modules that import kernels import too
    assert kernels.triton is None and kernels.fused_mlp is None and kernels.topk is None
    x, w, b, t = torch.randn(8, 16), torch.randn(24, 16), torch.randn(24), torch.randn(8, 24)
    q, g = torch.randn(5, 16), torch.randn(40, 16)
    print(torch.equal(kernels.cosine_topk(q, g, 3)[1], kernels.cosine_topk_reference(q, g, 3)[1]))   # auto: torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = kernels.fused_linear_temb_silu(x, w, b, t)
        v, i = kernels.cosine_topk(q, g, 3, backend="triton")
    print(torch.equal(y, kernels.fused_linear_temb_silu_reference(x, w, b, t)), torch.equal(i, kernels.cosine_topk_reference(q, g, 3)[1]))
    print(len(caught), [c.category.__name__ for c in caught])
    for call in (lambda: kernels.fused_linear_temb_silu(x, w, b, t, strict=True),
                 lambda: kernels.cosine_topk(q, g, 3, backend="triton", strict=True)):
        try:
            call()
        except kernels.KernelCheckError as e:
            print(str(e))
""")


def test_without_triton_the_package_imports_and_torch_answers():
    """macOS, Windows: no triton. Both functions answer with torch (one warning each where the kernel was asked
    for); with strict they raise KernelCheckError saying triton is not installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=os.path.dirname(dg.__file__), env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.strip().splitlines()
    assert out[:3] == ["True", "True True", "2 ['KernelFallbackWarning', 'KernelFallbackWarning']"], out
    for line, kernel in zip(out[3:5], ("fused_linear_temb_silu", "cosine_topk")):
        assert line.startswith(f"{kernel} (float32, cpu") and "triton is not installed" in line, line
