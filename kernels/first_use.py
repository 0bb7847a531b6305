"""The first-use check: before a kernel's first result in a process is trusted, it must match torch.

The kernels are tested under Triton's interpreter and compiled for sm_80 / sm_90 ahead of time,
but a GPU, a driver or a Triton release nobody here has tried could still miscompile them. So
the first time a kernel runs for a key (kernel, dtype, device, Triton version, fp32 dot
precision) in a process, it also runs a small fixed input through the kernel and through the
plain torch reference in float64, and compares them at the tolerances tests/test_kernels.py
states (TOL below): forward and backward for the fused step, values and indices (ties to the
lower index) for top-k. Each kernel module supplies that comparison as its `self_test`.

- It passes: the kernel runs, and nothing is checked again for that key in this process. The
  check uses its own random generator and leaves every result and RNG state as they were.
- It fails (a value out of tolerance, a compile error, a launch error), or a later launch for
  that key raises: the caller gets the torch path for the rest of the process, after ONE
  KernelFallbackWarning that gives the figures (the worst tensor and its error, the device, the
  Triton version). With strict=True (diffgap.KERNELS = "triton": the user asked for the kernels
  explicitly) a KernelCheckError is raised instead, every time that key is used.

Cost: a few kernel launches on tensors of ~10^4 elements and their float64 reference, once per
key and process: milliseconds on a GPU (the compile it triggers is the one the real call needs
anyway, at the same launch configuration); about a second per kernel and dtype under the
interpreter.
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton

# Tolerances of tests/test_kernels.py: fp32 1e-5 (the kernels accumulate in fp32 like torch);
# fp16 2e-2 absolute on values of order 1; bf16 6e-2 (8-bit mantissa); fp64 (gradcheck) 1e-9.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-9}
TF32_TOL = 2e-2   # fp32 with TF32 dots allowed: a 10-bit mantissa, like fp16


class KernelCheckError(RuntimeError):
    """A kernel failed its first-use check (or a launch) and the caller asked for the kernels explicitly."""


class KernelFallbackWarning(RuntimeWarning):
    """A kernel failed its first-use check (or a launch); the torch path is used instead."""


@dataclass
class Outcome:
    """What the check (or a later launch) found for one key."""
    ok: bool
    message: str = ""          # the figures, in one line, when not ok
    ms: float = 0.0            # how long the check took
    errors: dict = field(default_factory=dict)   # tensor -> (max abs error, tolerance), from the self test
    warned: bool = False


_outcomes: dict[tuple, Outcome] = {}
_lock = threading.RLock()


def tolerance(dtype: torch.dtype) -> float:
    """The check's tolerance for inputs of dtype; fp32 gets fp16's when torch allows TF32 dots."""
    from . import fp32_dot_precision
    if dtype == torch.float32 and fp32_dot_precision() == "tf32":
        return TF32_TOL
    return TOL.get(dtype, TOL[torch.float32])


def key(kernel: str, t: torch.Tensor) -> tuple:
    """(kernel, dtype, device, Triton version, fp32 dot precision): what one check vouches for."""
    from . import fp32_dot_precision
    return kernel, t.dtype, str(t.device), triton.__version__, fp32_dot_precision()


def device_name(device: torch.device) -> str:
    from . import INTERPRET
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return f"{device} (Triton interpreter)" if INTERPRET else str(device)


def _where(kernel: str, dtype: torch.dtype, device: torch.device) -> str:
    return f"{kernel} ({str(dtype).replace('torch.', '')}, {device_name(device)}, Triton {triton.__version__})"


def run_check(kernel: str, dtype: torch.dtype, device, self_test: Callable) -> Outcome:
    """Run self_test(dtype, device) once, uncached: an Outcome with its figures and time.

    self_test returns {tensor name: (max abs error, tolerance)} and may raise (compile or launch
    errors). A NaN error fails. Gradients are enabled and inference mode is off inside, so the
    check also runs from torch.no_grad() or torch.inference_mode() code such as sampling.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    try:
        # grads on and autocast off whatever the caller's context (sampling runs under no_grad or
        # inference_mode; autocast would round the float64 reference down)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            errors = self_test(dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any compile or launch failure means: do not use the kernel
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return Outcome(False, f"{_where(kernel, dtype, device)} failed to compile or run on the check's input: "
                              f"{type(e).__name__}: {first}", (time.perf_counter() - t0) * 1e3)
    ms = (time.perf_counter() - t0) * 1e3
    bad = {name: (err, tol) for name, (err, tol) in errors.items() if not err <= tol}   # NaN is bad
    if not bad:
        return Outcome(True, ms=ms, errors=errors)
    worst = lambda item: item[1][0] / item[1][1] if item[1][0] == item[1][0] and item[1][1] > 0 else float("inf")
    name, (err, tol) = max(bad.items(), key=worst)   # the tensor furthest beyond its tolerance (NaN first)
    others = ", ".join(f"{n} {e:.3g}" for n, (e, _) in bad.items() if n != name)
    return Outcome(False, f"{_where(kernel, dtype, device)} differs from the torch reference on the check's input: "
                          f"max error {err:.3g} in {name} (tolerance {tol:.3g})"
                          + (f"; also {others}" if others else ""), ms, errors)


def usable(kernel: str, t: torch.Tensor, strict: bool, self_test: Callable) -> bool:
    """Whether kernel may run for tensors like t (its dtype and device); checks it the first time.

    False means: take the torch path (a KernelFallbackWarning was given once). With strict, a
    failed check raises KernelCheckError instead of returning False.
    """
    k = key(kernel, t)
    outcome = _outcomes.get(k)
    if outcome is None:
        with _lock:
            outcome = _outcomes.get(k)
            if outcome is None:
                outcome = _outcomes[k] = run_check(kernel, t.dtype, t.device, self_test)
    if outcome.ok:
        return True
    _report(outcome, strict)
    return False


def failed(kernel: str, t: torch.Tensor, error: Exception, strict: bool) -> None:
    """A launch for tensors like t raised after the check passed: the key takes the torch path from now on.

    Warns once (or raises KernelCheckError from error when strict); the caller then computes
    with torch.
    """
    first = (str(error).strip().splitlines() or [""])[0][:300]
    with _lock:
        outcome = _outcomes[key(kernel, t)] = Outcome(
            False, f"{_where(kernel, t.dtype, t.device)} failed to compile or launch: {type(error).__name__}: {first}")
    _report(outcome, strict, error)


def _report(outcome: Outcome, strict: bool, cause: Exception | None = None) -> None:
    if strict:
        raise KernelCheckError(outcome.message + " (kernels asked for explicitly; use 'auto' to fall back to torch)") \
            from cause
    with _lock:
        if outcome.warned:
            return
        outcome.warned = True
    warnings.warn(outcome.message + "; using the torch path for the rest of this process", KernelFallbackWarning,
                  stacklevel=4)


def outcomes() -> dict[tuple, Outcome]:
    """A copy of every key checked in this process and what was found."""
    with _lock:
        return dict(_outcomes)


def reset() -> None:
    """Forget every check (tests; a process that changed its GPU setup)."""
    with _lock:
        _outcomes.clear()


def max_error(got: torch.Tensor, ref: torch.Tensor, tol: float, scale: bool = True) -> tuple[float, float]:
    """(max |got - ref|, allowed) with allowed = tol * max(1, max |ref|) when scale, else tol.

    The tests' rule: values of order 1 compare at tol, sums over many rows (db, dW) relative to
    their size. A non-finite got gives NaN (fails).
    """
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return float("nan"), tol
    if not torch.isfinite(got).all():
        return float("nan"), tol
    allowed = tol * max(1.0, ref.abs().max().item()) if scale and ref.numel() else tol
    return ((got - ref).abs().max().item() if got.numel() else 0.0), allowed
