"""The first-use check (kernels/first_use.py): a kernel's first result per (kernel, dtype, device,
Triton version) in a process is checked against torch; a wrong result or a compile / launch error
gives one warning and the torch path, or an error when the kernels were asked for explicitly.

On a CPU the kernels run under Triton's interpreter; faults are injected by standing in for the
@triton.jit kernels: run the real one, then corrupt an output, or raise instead of launching.
"""
import importlib
import time
import warnings

import pytest
import torch

import diffgap as dg

kernels = pytest.importorskip("kernels")
from kernels import KernelCheckError, KernelFallbackWarning, first_use  # noqa: E402

topk_mod, fused_mlp = (importlib.import_module(f"kernels.{m}") for m in ("cosine_topk", "fused_mlp"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def fresh_checks():
    """Every test starts, and leaves, a process in which no kernel has been checked yet."""
    first_use.reset()
    yield
    first_use.reset()


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


def inject(monkeypatch, which, fault_kwargs):
    mod, attr = {"fused_fwd": (fused_mlp, "_fused_fwd_kernel"), "fused_bwd": (fused_mlp, "_fused_bwd_kernel"),
                 "cosine_topk": (topk_mod, "_cosine_topk_kernel")}[which]
    fault = Fault(getattr(mod, attr), **fault_kwargs)
    monkeypatch.setattr(mod, attr, fault)
    return fault


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


def test_a_correct_kernel_passes_and_changes_no_result():
    inputs = fused_inputs()
    cpu_rng, cuda_rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # sampling's context, and mixed precision: the check still runs its backward and its float64 reference
        with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            x, w, b, t = (a.detach() for a in inputs)
            y_inf = kernels.fused_linear_temb_silu(x, w, b, t)
        api = fused_run(kernels.fused_linear_temb_silu, inputs)
        q, g = topk_inputs()
        top = TOPK_API(q, g)
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    if cuda_rng is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng))
    raw = fused_run(lambda *a: fused_mlp.FusedLinearTembSiLU.apply(*a, None), inputs)
    assert all(torch.equal(a, b) for a, b in zip(api, raw))          # bit for bit: the kernel's results
    assert torch.equal(y_inf, raw[0])
    raw_top = topk_mod.cosine_topk_triton(q, g, 10)
    assert torch.equal(top[0], raw_top[0]) and torch.equal(top[1], raw_top[1])
    done = first_use.outcomes()
    assert {k[0] for k in done} == {"fused_linear_temb_silu", "cosine_topk"} and all(o.ok for o in done.values())
    # the figures are recorded: every tensor the check compares, within its tolerance
    fused_errors = next(o.errors for k, o in done.items() if k[0] == "fused_linear_temb_silu")
    assert {"y", "dx", "dW", "db", "dtemb", "broadcast temb: dtemb", "y without grad"} <= set(fused_errors)
    assert all(0 <= err <= tol for err, tol in fused_errors.values())


def test_the_check_runs_once_per_process_and_key(monkeypatch):
    runs = []
    real = first_use.run_check
    monkeypatch.setattr(first_use, "run_check", lambda kernel, dtype, *a: runs.append((kernel, dtype)) or real(kernel, dtype, *a))
    x, w, b, t = (a.detach() for a in fused_inputs())
    for _ in range(3):
        kernels.fused_linear_temb_silu(x, w, b, t)
    kernels.fused_linear_temb_silu(x.half(), w.half(), b.half(), t.half())   # another dtype: another key
    q, g = topk_inputs()
    TOPK_API(q, g), TOPK_API(q, g)
    kernels.cosine_topk(q, g, 40, backend="triton")                          # k > K_MAX: torch, nothing to check
    kernels.cosine_topk(q, g, 10, backend="torch")
    assert runs == [("fused_linear_temb_silu", torch.float32), ("fused_linear_temb_silu", torch.float16),
                    ("cosine_topk", torch.float32)]
    assert len(first_use.outcomes()) == 3


WRONG = {   # kernel, output argument, corruption: each a plausible miscompile
    "fused forward": ("fused_fwd", 4, lambda y: y.add_(0.5)),          # y
    "fused backward": ("fused_bwd", 2, lambda dz: dz.mul_(1.5)),       # dz: dx and dW go wrong, db does not
    "top-k": ("cosine_topk", 5, lambda idx: idx.add_(1)),              # indices
    "top-k values": ("cosine_topk", 4, lambda v: v.add_(1e-3)),        # values only, indices right
}


@pytest.mark.parametrize("case", list(WRONG))
@pytest.mark.parametrize("fault", ["wrong result", "launch error"])
def test_a_failing_kernel_warns_once_and_the_torch_path_takes_over(case, fault, monkeypatch):
    which, arg, corrupt = WRONG[case]
    spec = dict(arg=arg, corrupt=corrupt) if fault == "wrong result" else dict(error=RuntimeError("injected launch failure"))
    f = inject(monkeypatch, which, spec)
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
    assert first_use.device_name(torch.empty(0, device=DEVICE).device) in msg and f"Triton {kernels.first_use.triton.__version__}" in msg
    assert "using the torch path for the rest of this process" in msg
    if fault == "wrong result":
        name = {"fused forward": "in y ", "fused backward": "in dW ", "top-k": "in indices ", "top-k values": "in values "}[case]
        assert "max error" in msg and name in msg, msg
    else:
        assert "failed to compile or run" in msg and "RuntimeError: injected launch failure" in msg, msg
    assert all(torch.equal(a, b) for a, b in zip(got, want))     # exactly the torch path's results
    launched = f.launches
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # no second warning
        again = call()
    assert all(torch.equal(a, b) for a, b in zip(again, want)) and f.launches == launched   # kernel not used again


@pytest.mark.parametrize("fault", ["wrong result", "launch error"])
def test_kernels_asked_for_explicitly_raise(fault, monkeypatch):
    for which, arg, corrupt in (WRONG["fused forward"], WRONG["top-k"]):
        spec = dict(arg=arg, corrupt=corrupt) if fault == "wrong result" else dict(error=RuntimeError("injected"))
        inject(monkeypatch, which, spec)
    x, w, b, t = fused_inputs()
    q, g = topk_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):    # every call, not only the first
            with pytest.raises(KernelCheckError, match="max error|failed to compile"):
                kernels.fused_linear_temb_silu(x, w, b, t, strict=True)
            with pytest.raises(KernelCheckError, match="max error|failed to compile"):
                TOPK_API(q, g, strict=True)


def test_a_launch_error_after_a_passed_check_falls_back_forward_and_backward(monkeypatch):
    inputs = fused_inputs()
    assert kernels.fused_linear_temb_silu(*(a.detach() for a in inputs)) is not None   # the check passes
    assert all(o.ok for o in first_use.outcomes().values())
    inject(monkeypatch, "fused_bwd", dict(error=RuntimeError("injected backward failure")))
    with pytest.warns(KernelFallbackWarning, match="failed to compile or launch: RuntimeError: injected backward"):
        got = fused_run(kernels.fused_linear_temb_silu, inputs)     # the forward ran the kernel, the backward could not
    want = FUSED_TORCH(inputs)   # got: the kernel's forward, torch's dz; equal within the fp32 tolerance
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, want))
    fwd = inject(monkeypatch, "fused_fwd", dict(error=RuntimeError("never launched")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = fused_run(kernels.fused_linear_temb_silu, inputs)
    assert fwd.launches == 0 and all(torch.equal(a, b) for a, b in zip(later, want))
    with pytest.raises(KernelCheckError, match="injected backward failure"):   # strict: raises on every use
        kernels.fused_linear_temb_silu(*inputs, strict=True)


def test_diffgap_kernels_triton_raises_and_auto_on_cuda_falls_back(monkeypatch):
    inject(monkeypatch, "fused_fwd", dict(arg=4, corrupt=lambda y: y.add_(0.5)))
    model = dg.DiffGAP(dg.DiffGAPConfig(dim_a=24, dim_b=24, hidden=32, inner=16, depth=2, time_dim=16)).to(DEVICE)
    a, b = torch.randn(16, 24).to(DEVICE), torch.randn(16, 24).to(DEVICE)
    opt = dg.make_optimizer(model, 1e-2)
    monkeypatch.setattr(dg, "KERNELS", "triton")
    with pytest.raises(KernelCheckError, match="max error"):
        next(dg.train_steps(model, a, b, opt, 1, 16, seed=0))
    if DEVICE.type == "cuda":   # "auto" on CUDA: one warning, then the torch path
        monkeypatch.setattr(dg, "KERNELS", "auto")
        first_use.reset()
        with pytest.warns(KernelFallbackWarning):
            next(dg.train_steps(model, a, b, opt, 1, 16, seed=0))


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_each_dtype_is_checked_at_its_own_tolerance(precision, monkeypatch):
    """TF32 loosens fp32's tolerance to fp16's, and changes no other dtype's."""
    monkeypatch.setattr(kernels, "fp32_dot_precision", lambda: precision)
    want = {torch.float32: 1e-5 if precision == "ieee" else 2e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2,
            torch.float64: 1e-9}
    assert {dtype: first_use.tolerance(dtype) for dtype in want} == want


def test_the_autograd_function_falls_back_by_default_when_its_backward_fails(monkeypatch):
    """FusedLinearTembSiLU.apply without `strict` (autograd passes no keywords): a failing backward
    launch warns once and computes dz in torch, as the public function does."""
    inputs = fused_inputs()
    inject(monkeypatch, "fused_bwd", dict(error=RuntimeError("injected backward failure")))
    with pytest.warns(KernelFallbackWarning, match="injected backward failure"):
        got = fused_run(lambda *a: fused_mlp.FusedLinearTembSiLU.apply(*a), inputs)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, FUSED_TORCH(inputs)))


def test_a_top_k_launch_error_after_a_passed_check_falls_back(monkeypatch):
    q, g = topk_inputs()
    want = TOPK_TORCH(q, g)
    v, i = TOPK_API(q, g)                             # the check passes, the kernel answers
    assert torch.equal(i, want[1]) and torch.allclose(v, want[0], atol=1e-5)
    inject(monkeypatch, "cosine_topk", dict(error=RuntimeError("injected top-k failure")))
    with pytest.warns(KernelFallbackWarning, match="failed to compile or launch: RuntimeError: injected top-k"):
        got = TOPK_API(q, g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(KernelCheckError, match="injected top-k failure"):
        TOPK_API(q, g, strict=True)


def test_max_error_allows_tol_up_to_magnitude_1_and_relative_beyond():
    ref = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert first_use.max_error(ref + 1.5e-5, ref, 1e-5) == (pytest.approx(1.5e-5), 1e-5)         # fails at 1e-5
    assert first_use.max_error(ref * 100, ref * 100, 1e-5)[1] == pytest.approx(1e-3)             # 100 x tol
    assert first_use.max_error(ref * 100 + 0.5, ref * 100, 1e-5, scale=False)[1] == 1e-5
    assert first_use.max_error(ref[:1], ref, 1e-5)[0] != first_use.max_error(ref[:1], ref, 1e-5)[0]   # NaN: shapes


def test_the_check_reports_where_it_ran_its_time_and_a_cut_first_line(monkeypatch):
    name = first_use.device_name(torch.device("cpu"))
    assert name == ("cpu (Triton interpreter)" if kernels.INTERPRET else "cpu")
    assert first_use.max_error(torch.empty(0), torch.empty(0), 1e-5) == (0.0, 1e-5)

    def slow(result):   # a self test that takes 30 ms, then returns or raises
        def self_test(dtype, device):
            time.sleep(0.03)
            if isinstance(result, Exception):
                raise result
            return result
        return self_test
    long = RuntimeError("x" * 400 + "\nsecond line")
    for result in ({"y": (0.0, 1e-5)}, long):
        t0 = time.perf_counter()
        out = first_use.run_check("fused_linear_temb_silu", torch.float32, "cpu", slow(result))
        assert 30 <= out.ms <= (time.perf_counter() - t0) * 1e3 and out.ok == (result is not long)
    assert "x" * 300 in out.message and "x" * 301 not in out.message and "second line" not in out.message
    # a launch that fails after the check passed: the same cut
    TOPK_API(*topk_inputs())
    inject(monkeypatch, "cosine_topk", dict(error=long))
    with pytest.warns(KernelFallbackWarning) as caught:
        TOPK_API(*topk_inputs())
    msg = str(caught[0].message)
    assert "x" * 300 in msg and "x" * 301 not in msg and "second line" not in msg


def test_a_wrong_result_names_the_worst_tensor_and_the_others():
    errors = {"y": (0.5, 1e-5), "dx": (1e-6, 1e-5), "dW": (3e-3, 1e-5)}
    out = first_use.run_check("fused_linear_temb_silu", torch.float32, "cpu", lambda dtype, device: errors)
    assert not out.ok and "max error 0.5 in y (tolerance 1e-05); also dW 0.003" in out.message, out.message
    assert "dx" not in out.message


def test_a_forward_launch_error_after_a_passed_check_falls_back(monkeypatch):
    inputs = [a.detach() for a in fused_inputs()]
    kernels.fused_linear_temb_silu(*inputs)                                  # the check passes
    inject(monkeypatch, "fused_fwd", dict(error=RuntimeError("injected forward failure")))
    with pytest.warns(KernelFallbackWarning, match="RuntimeError: injected forward failure"):
        got = kernels.fused_linear_temb_silu(*inputs)
    assert torch.equal(got, kernels.fused_linear_temb_silu_reference(*inputs))
