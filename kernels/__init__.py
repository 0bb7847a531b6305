"""Two Triton kernels for diffgap, fused_linear_temb_silu (fused_mlp.py) and cosine_topk (topk.py), each held
to the plain torch expression beside it here; this file needs no triton (without it both answer with torch).
CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 set before this import.

The first GPU, driver or Triton release to run a kernel may be a user's. So the first time a kernel runs for
a (kernel, dtype, device, fp32 dot precision) key in a process, its self_test holds it to the torch reference
in float64 at the tests' tolerances (TOL); if it disagrees, fails to compile or a launch raises (then or
later), one KernelFallbackWarning gives the figures and torch answers from then on (strict=True: raises)."""
import os
import threading
import warnings

import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # read, never set
K_MAX = 32  # a larger k takes the torch path: the kernel's running top-k would not fit in registers
# fp32 1e-5 (both accumulate in fp32); fp16 2e-2, bf16 6e-2 on values of order 1 (the output and dz are
# rounded, then multiplied by torch in that precision); fp64 1e-9 (gradcheck); TF32 dots as fp16
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-9}


def torch_allows_tf32() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use TF32. torch >= 2.9's fp32_precision resolves the global
    and legacy settings; the legacy getter raises once it was used, and its "none" then means IEEE."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)   # None before torch 2.9
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)   # also set by torch.set_float32_matmul_precision
    except RuntimeError:
        return False


def fp32_dot_precision() -> str:
    """tl.dot's input_precision for fp32 tiles: torch's, not Triton's default TF32 (a 10-bit mantissa)."""
    return "tf32" if torch_allows_tf32() else "ieee"


def fused_linear_temb_silu_reference(x, weight, bias, temb):
    """silu(x @ weight^T + bias + temb) in plain torch: what the fused kernels must equal, and their fallback."""
    return F.silu(F.linear(x, weight, bias) + temb)


def unit_stride(a: torch.Tensor) -> torch.Tensor:
    """a, or a copy where its last dimension is not contiguous: the kernels take any row stride."""
    return a if a.stride(-1) == 1 else a.contiguous()


def _merge(vals: torch.Tensor, idx: torch.Tensor, k: int):
    """The k best of each row by (value descending, index ascending)."""
    order = torch.sort(idx, dim=1, stable=True).indices                           # index ascending first,
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]  # then value, stably
    return vals.gather(1, order), idx.gather(1, order)


def _chunk_topk(s: torch.Tensor, k: int):
    """_merge of a score chunk s (M, C) and its columns, fast: torch.topk orders ties arbitrarily, so only the
    rows whose (k+1)-th best equals their k-th (a tie across the k-th place) need a full sort."""
    v, i = torch.topk(s, min(k + 1, s.shape[1]), dim=1)
    tied = (v[:, k] == v[:, k - 1]).nonzero().flatten() if v.shape[1] > k else []
    v, i = _merge(v[:, :k], i[:, :k], k)
    if len(tied):
        v[tied], i[tied] = _merge(s[tied], torch.arange(s.shape[1], device=s.device).expand(len(tied), -1), k)
    return v, i


@torch.no_grad()
def cosine_topk_torch(queries: torch.Tensor, gallery: torch.Tensor, k: int, budget_bytes: int = 16 << 20):
    """cosine_topk's torch path: a running top-k over gallery chunks whose (M, chunk) fp32 scores fit in
    budget_bytes, so memory is O(M (chunk + k)). A chunk's scores are exactly the retrieval metrics'
    F.normalize(queries.float()) @ F.normalize(chunk.float()).T, so that figures do not depend on the path."""
    M, N, k = len(queries), len(gallery), min(k, len(gallery))
    q = F.normalize(queries.float(), dim=-1)
    chunk = min(8192, budget_bytes // (4 * max(M, 1)))
    if chunk >= 512:
        chunk -= chunk % 512   # the CPU GEMM runs ~35% slower at 4,194 gallery rows than at 4,096
    chunk = max(k + 1, chunk)
    scores = q.new_empty(M, chunk)   # reused: a fresh multi-MB block per chunk costs page faults
    best_v, best_i = q.new_empty(M, 0), torch.empty(M, 0, dtype=torch.long, device=q.device)
    for start in range(0, N, chunk):
        g = F.normalize(gallery[start:start + chunk].float(), dim=-1)
        v, i = _chunk_topk(torch.mm(q, g.T, out=scores) if len(g) == chunk else q @ g.T, k)
        # the running best holds only lower indices, so _merge's (value, index) order is exact
        best_v, best_i = _merge(torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1), k)
    return best_v, best_i


def cosine_topk_reference(queries: torch.Tensor, gallery: torch.Tensor, k: int):
    """The full (M, N) score matrix, then a (value, index) sort: what the tests hold both paths to."""
    s = F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    return _merge(s, torch.arange(len(gallery), device=s.device).expand_as(s), min(k, len(gallery)))


class KernelCheckError(RuntimeError):
    """A kernel failed its first-use check or a launch, and the caller asked for the kernels (strict)."""


class KernelFallbackWarning(RuntimeWarning):
    """A kernel failed its first-use check or a launch; the torch path answers instead."""


def max_error(got: torch.Tensor, ref: torch.Tensor, tol: float, scale: bool = True) -> tuple[float, float]:
    """(max |got - ref|, allowed): tol, times max |ref| where that exceeds 1 and scale (sums over rows, such
    as db, grow with them). A wrong shape or a non-finite value gives NaN, which fails."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return float("nan"), tol
    allowed = tol * max(1.0, ref.abs().max().item()) if scale and ref.numel() else tol
    return ((got - ref).abs().max().item() if got.numel() else 0.0), allowed


_verdicts: dict = {}   # key -> None (the kernel passed its check) or why the torch path answers
_warned: set = set()
_lock = threading.Lock()


def _why(kernel: str, t: torch.Tensor, what: str, e: Exception | None = None) -> str:
    device = f"{t.device} ({torch.cuda.get_device_name(t.device) if t.is_cuda else 'Triton interpreter'})" \
        if t.is_cuda or INTERPRET else str(t.device)
    cause = f": {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}" if e else ""
    return f"{kernel} ({str(t.dtype)[6:]}, {device}, Triton {triton and triton.__version__}) {what}{cause}"


def _check(kernel: str, t: torch.Tensor, self_test) -> str | None:
    """Why the kernel may not answer for tensors like t (self_test's figures, or its error), or None."""
    if self_test is None:
        return _why(kernel, t, f"cannot run: triton is not installed or does not import ({_no_triton})")
    try:   # gradients on, autocast off, whatever the caller's context (sampling runs in inference_mode)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(t.device.type, enabled=False):
            errors = self_test(t.dtype, t.device)
    except Exception as e:  # noqa: BLE001 - any compile or launch failure means: do not use the kernel
        return _why(kernel, t, "failed to compile or run on the check's input", e)
    bad = ", ".join(f"{name} {err:.3g} (tolerance {tol:.3g})" for name, (err, tol) in errors.items() if not err <= tol)
    return _why(kernel, t, f"differs from torch on the check's input: max error in {bad}") if bad else None


def fail(kernel: str, t: torch.Tensor, strict: bool, error: Exception | None = None) -> None:
    """Torch answers for tensors like t from now on: one KernelFallbackWarning, or KernelCheckError if strict."""
    key = (kernel, t.dtype, str(t.device), fp32_dot_precision())
    with _lock:
        why = _verdicts[key] = _verdicts.get(key) or _why(kernel, t, "failed to compile or launch", error)
        warn = not strict and key not in _warned
        if warn:
            _warned.add(key)
    if strict:
        raise KernelCheckError(why + " (the kernels were asked for: 'auto' falls back to torch)") from error
    if warn:   # stacklevel 4: the line that called the public function
        warnings.warn(why + "; the torch path answers for the rest of this process", KernelFallbackWarning, 4)


def run_checked(kernel: str, t: torch.Tensor, strict: bool, self_test, launch):
    """launch() if the kernel is trusted for tensors like t (checked the first time), else None after fail."""
    key = (kernel, t.dtype, str(t.device), fp32_dot_precision())
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _check(kernel, t, self_test)
    try:
        if _verdicts[key] is None:
            return launch()
    except Exception as e:  # noqa: BLE001 - a compile or launch error at these shapes
        return fail(kernel, t, strict, e)
    return fail(kernel, t, strict)


def fused_linear_temb_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temb: torch.Tensor,
                           strict: bool = False) -> torch.Tensor:
    """silu(x @ weight^T + bias + temb), x (B, K), weight (N, K), bias (N,), temb (B, N) -> (B, N) in x's
    dtype, differentiable in all four: by the kernels once trusted (module docstring), else the reference."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or bias.shape != weight.shape[:1] or \
            temb.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)} and temb "
                         f"{tuple(temb.shape)} do not fit the fused step: (B, K), (N, K), (N,), (B, N)")
    grad = torch.is_grad_enabled() and any(a.requires_grad for a in (x, weight, bias, temb))   # else store no z
    y = None if 0 in (*x.shape, weight.shape[0]) else run_checked(   # nothing to launch: torch's empty answer
        "fused_linear_temb_silu", x, strict, fused_mlp and fused_mlp.self_test,
        lambda: fused_mlp.FusedLinearTembSiLU.apply(x, weight, bias, temb, strict, grad))
    return fused_linear_temb_silu_reference(x, weight, bias, temb) if y is None else y


def cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, backend: str = "auto", strict: bool = False):
    """The k best cosines (F.normalize's: a zero row scores 0) of each query (M, D) in the gallery (N, D):
    values (M, k) float32, descending, and gallery indices (M, k) int64, ties to the lower index; k is capped
    at N. backend "auto": the kernel (once trusted; k <= K_MAX) for CUDA tensors, else the chunked torch path."""
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} do not fit: (M, D) (N, D)")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    kernel = backend == "triton" or backend == "auto" and queries.is_cuda
    if kernel and len(queries) and 0 < min(k, len(gallery)) <= K_MAX:
        out = run_checked("cosine_topk", queries, strict, topk and topk.self_test,
                          lambda: topk.cosine_topk_triton(queries, gallery, k))
        if out is not None:
            return out
    return cosine_topk_torch(queries, gallery, k)


try:   # last: the kernel modules import the names above
    import triton
    from . import fused_mlp, topk
except Exception as e:  # noqa: BLE001 - no triton (macOS, Windows), or one the kernels cannot be defined with
    triton = fused_mlp = topk = None
    _no_triton = f"{type(e).__name__}: {e}"
