"""Hand-written Triton kernels for diffgap, each with the plain torch reference it is tested against.

    fused_linear_temb_silu(x, W, b, temb)   silu(x @ W^T + b + temb), forward and backward
    cosine_topk(queries, gallery, k)        cosine top-k without the (M, N) score matrix

diffgap.py uses these kernels on CUDA tensors only, unless asked otherwise. To run them on CPU
tensors, start the process with TRITON_INTERPRET=1 (Triton's interpreter reads it when a
@triton.jit function is defined, so before this package is imported; tests/conftest.py sets
it). That is slow and meant for tests and debugging. Importing this package changes no
environment variable or torch flag: it would silently move every other Triton kernel of the
user's process into the interpreter.

First use: the first time each kernel runs for a dtype and device in a process it is also
checked against its torch reference on a small fixed input (kernels/first_use.py); a kernel
that fails, or whose launch raises, is replaced by the torch path for the rest of the process
after one KernelFallbackWarning, or raises KernelCheckError when called with strict=True.
"""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # read, never set
DIFFGAP_KERNELS = True  # diffgap.py takes a module called `kernels` only if it says it is this one


def torch_allows_tf32() -> bool:
    """Whether torch lets fp32 matmuls on CUDA run in TF32; reads the flags without ever raising.

    torch >= 2.9 has a new API: torch.backends.fp32_precision (all backends) and
    torch.backends.cuda.matmul.fp32_precision (cuBLAS only), "ieee" or "tf32", where "none"
    inherits from the level above. Its getter for cuda.matmul resolves that inheritance and
    also reflects the legacy setters (torch.backends.cuda.matmul.allow_tf32 = ...,
    torch.set_float32_matmul_precision(...)), so it is read first. The legacy getters are not
    safe to read: once the new API has been used they raise RuntimeError ("mix of the legacy
    and new APIs"), and cuBLAS then follows the new setting. So the legacy allow_tf32 flag is
    read only where the new API does not exist (torch < 2.9) or says "none" (nothing set),
    and a RuntimeError from it means the new API's "none", i.e. IEEE.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:      # torch < 2.9: the attribute does not exist
        precision = None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)   # True also after torch.set_float32_matmul_precision("high")
    except RuntimeError:
        return False


def fp32_dot_precision() -> str:
    """tl.dot's input_precision for fp32 tiles: "ieee" unless torch itself allows TF32.

    Triton's default for fp32 dots is TF32 (a 10-bit mantissa, ~1e-3 relative error), while
    torch's fp32 matmuls are IEEE fp32 until the user opts in, with
    torch.backends.fp32_precision = "tf32" or torch.backends.cuda.matmul.fp32_precision = "tf32"
    (torch >= 2.9), or the legacy torch.backends.cuda.matmul.allow_tf32 = True or
    torch.set_float32_matmul_precision("high"). Following torch's setting (torch_allows_tf32)
    keeps a kernel within fp32 tolerance of the torch path it replaces.
    """
    return "tf32" if torch_allows_tf32() else "ieee"


from .first_use import KernelCheckError, KernelFallbackWarning  # noqa: E402
from .cosine_topk import cosine_topk, cosine_topk_reference, cosine_topk_torch  # noqa: E402
from .fused_mlp import fused_linear_temb_silu, reference as fused_linear_temb_silu_reference  # noqa: E402

__all__ = ["INTERPRET", "torch_allows_tf32", "fp32_dot_precision", "KernelCheckError", "KernelFallbackWarning",
           "cosine_topk", "cosine_topk_reference", "cosine_topk_torch", "fused_linear_temb_silu",
           "fused_linear_temb_silu_reference"]
