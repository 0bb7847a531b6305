"""Hand-written Triton kernels for diffgap, each with the plain torch reference it is tested against.

    fused_linear_temb_silu(x, W, b, temb)   silu(x @ W^T + b + temb), forward and backward
    cosine_topk(queries, gallery, k)        cosine top-k without the (M, N) score matrix

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, which must be
set before any @triton.jit function is defined, so it is set here, before they are). That is
slow and meant for tests and debugging; diffgap.py uses these kernels on CUDA tensors only,
unless asked otherwise.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def fp32_dot_precision() -> str:
    """tl.dot's input_precision for fp32 tiles: "ieee" unless torch itself allows TF32.

    Triton's default for fp32 dots is TF32 (a 10-bit mantissa, ~1e-3 relative error), while
    torch's fp32 matmuls are IEEE fp32 until the user opts in with
    torch.backends.cuda.matmul.allow_tf32 = True or torch.set_float32_matmul_precision("high").
    Following torch's setting keeps a kernel within fp32 tolerance of the torch path it replaces.
    """
    tf32 = (torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
            or getattr(torch.backends.cuda.matmul, "fp32_precision", "none") == "tf32")
    return "tf32" if tf32 else "ieee"


from .cosine_topk import cosine_topk, cosine_topk_reference, cosine_topk_torch  # noqa: E402
from .fused_mlp import fused_linear_temb_silu, reference as fused_linear_temb_silu_reference  # noqa: E402

__all__ = ["INTERPRET", "fp32_dot_precision", "cosine_topk", "cosine_topk_reference", "cosine_topk_torch",
           "fused_linear_temb_silu", "fused_linear_temb_silu_reference"]
