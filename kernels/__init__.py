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

from .cosine_topk import cosine_topk, cosine_topk_reference, cosine_topk_torch  # noqa: E402
from .fused_mlp import fused_linear_temb_silu, reference as fused_linear_temb_silu_reference  # noqa: E402

__all__ = ["INTERPRET", "cosine_topk", "cosine_topk_reference", "cosine_topk_torch",
           "fused_linear_temb_silu", "fused_linear_temb_silu_reference"]
