"""Ahead-of-time compilation of the kernels for a GPU, on a machine without one.

    from kernels import aot
    for case in aot.cases():                      # every kernel at the configs its launcher picks
        r = aot.compile_case(case, arch=90)       # sm_90 (H100); 80 is A100
        print(case.label, r.registers, r.spill_bytes, r.tensor_core_ops)

Triton compiles for GPUTarget("cuda", arch, 32) with the ptxas shipped in its wheel, and the
wheel's cuobjdump reads the cubin: registers per thread, stack (local memory: spills),
shared memory, and the SASS, where tensor-core instructions (HMMA, HGMMA) show. The
interpreter that runs the kernels on a CPU shows none of this, and accepts programs the GPU
compiler rejects. `python benchmarks/kernel_report.py` prints the table; tests/test_aot.py
asserts on it. Figures are compiled, not run: they say what the GPU would be given.

compile_all() compiles in a child process with TRITON_INTERPRET=0: under the interpreter,
@triton.jit helpers of triton.language (the combine functions of tl.max, ...) are interpreter
wrappers, and calling them during code generation patches triton.language for the rest of the
process, so a second compile in an interpreter process fails. `python -m kernels.aot` is that
child: it prints one JSON row per (case, arch).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton

from .cosine_topk import K_MAX, _cosine_topk_kernel, topk_config
from .fused_mlp import _fused_bwd_kernel, _fused_fwd_kernel, backward_config, fused_config

ARCHS = (80, 90)                      # A100, H100
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

# Per-SM limits used for occupancy (CUDA C Programming Guide, compute capability tables).
SM_LIMITS = {  # arch: registers, warps, blocks, shared bytes per SM, reserved shared bytes per block
    80: dict(name="A100", regs=65536, warps=64, blocks=32, shared=167936, reserved=1024),
    90: dict(name="H100", regs=65536, warps=64, blocks=32, shared=233472, reserved=1024),
}


@dataclass
class Case:
    """One kernel at one launch configuration, as its launcher would call it."""
    kernel: str            # "cosine_topk", "fused_fwd", "fused_bwd"
    fn: object             # the @triton.jit function
    args: dict             # runtime argument -> pointer type ("*fp32") or the int a launch would pass
    constexprs: dict       # compile-time arguments, exactly as the launcher's config function gives them
    num_warps: int
    dtype: torch.dtype
    label: str             # the config in words, for reports


def _ints_and_constexprs(fn, args: dict, constexprs: dict):
    """Triton's launch-time specialisation (runtime/jit.py): pointers are assumed 16-byte aligned,
    ints divisible by 16 get the divisibility attribute and ints equal to 1 become constants."""
    names = fn.arg_names
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def cases(dtypes=DTYPES) -> list[Case]:
    """Every kernel at the configs its launcher picks for this project's shapes.

    Top-k: 1,000 queries x D = 512 over a 200,000-item gallery, k = 10 (what evaluation asks) and
    k = K_MAX (the largest the kernel takes). Fused step: the default denoiser's hidden step,
    batch 64 (the paper's), K = 512 -> N = 224, per-row temb, with and without storing z.
    """
    out = []
    for dt in dtypes:
        for k in (10, K_MAX):
            M, N, D = 1000, 200_000, 512
            cfg = topk_config(M, D, k, dt, interpret=False)
            warps = cfg.pop("num_warps")
            args = dict(q_ptr=POINTER[dt], g_ptr=POINTER[dt], qinv_ptr="*fp32", ginv_ptr="*fp32", out_v_ptr="*fp32",
                        out_i_ptr="*i32", M=M, N=N, D=D, slice_len=cfg["BLOCK_N"] * 50, stride_qm=D, stride_qd=1,
                        stride_gn=D, stride_gd=1)
            label = f"k={k} BLOCK {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_D']} warps {warps}"
            out.append(Case("cosine_topk", _cosine_topk_kernel, args, cfg, warps, dt, label))
        M, K, N = 64, 512, 224
        cfg = fused_config(M, N, K, dt, interpret=False)
        warps = cfg.pop("num_warps")
        for store_z in (True, False):
            args = dict(x_ptr=POINTER[dt], w_ptr=POINTER[dt], b_ptr=POINTER[dt], t_ptr=POINTER[dt], y_ptr=POINTER[dt],
                        z_ptr=POINTER[dt], M=M, N=N, K=K, stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1,
                        stride_tm=N, stride_tn=1, stride_ym=N, stride_yn=1)
            label = (f"store_z={int(store_z)} BLOCK {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} warps {warps}")
            out.append(Case("fused_fwd", _fused_fwd_kernel, args, dict(cfg, TEMB_ROWS=True, STORE_Z=store_z),
                            warps, dt, label))
        cfg = backward_config(M, N, dt, interpret=False)
        warps = cfg.pop("num_warps")
        args = dict(dy_ptr=POINTER[dt], z_ptr=POINTER[dt], dz_ptr=POINTER[dt], part_ptr="*fp32", M=M, N=N,
                    stride_m=N, stride_n=1)
        out.append(Case("fused_bwd", _fused_bwd_kernel, args, cfg, warps, dt,
                        f"BLOCK {cfg['BLOCK_M']}x{cfg['BLOCK_N']} warps {warps}"))
    return out


def backend_missing() -> str | None:
    """Why AOT compilation for CUDA cannot run here, or None when it can."""
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"triton has no backends module ({e})"
    if "nvidia" not in backends:
        return "this triton build has no NVIDIA backend"
    if not os.path.isfile(cuobjdump()):
        return f"no cuobjdump at {cuobjdump()}"
    return None


def cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Compiled:
    ptx: str
    sass: str
    registers: int          # per thread
    spill_bytes: int        # stack frame: local memory the compiler needed beyond registers
    shared_bytes: int       # dynamic shared memory per block (Triton's pipelining buffers)
    tensor_core_ops: int    # HMMA / HGMMA instructions in the SASS
    num_warps: int

    @property
    def tf32(self) -> bool:
        """Whether the PTX multiplies in TF32 (tensor cores at a 10-bit mantissa)."""
        return ".tf32" in self.ptx

    def blocks_per_sm(self, arch: int) -> int:
        """Resident blocks per SM allowed by registers, shared memory, warps and the block cap."""
        lim = SM_LIMITS[arch]
        regs_per_warp = -(-self.registers * 32 // 256) * 256          # allocated per warp in units of 256
        by_regs = (lim["regs"] // regs_per_warp) // self.num_warps
        by_shared = lim["shared"] // (self.shared_bytes + lim["reserved"])
        return min(by_regs, by_shared, lim["warps"] // self.num_warps, lim["blocks"])

    def occupancy(self, arch: int) -> float:
        """Resident warps per SM over the maximum (64)."""
        return self.blocks_per_sm(arch) * self.num_warps / SM_LIMITS[arch]["warps"]


@functools.lru_cache(maxsize=None)
def _jit(fn):
    """A compilable JITFunction; under the interpreter @triton.jit returns a wrapper of the Python function."""
    from triton.runtime.jit import JITFunction
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def compile_case(case: Case, arch: int = 90) -> Compiled:
    """Compile one case for sm_<arch> and read its resources from the cubin."""
    from triton.backends.compiler import GPUTarget
    fn = _jit(case.fn)
    signature, consts, attrs = _ints_and_constexprs(fn, case.args, case.constexprs)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))
    return Compiled(ptx=kernel.asm["ptx"], sass=sass, registers=field("REG"), spill_bytes=field("STACK"),
                    shared_bytes=kernel.metadata.shared, num_warps=case.num_warps,
                    tensor_core_ops=len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass)))


def row(case: Case, arch: int, result: Compiled) -> dict:
    """One report row: what the case is and what the compiler gave it."""
    return dict(kernel=case.kernel, dtype=str(case.dtype).replace("torch.", ""), arch=arch, config=case.label,
                constexprs={k: str(v) for k, v in case.constexprs.items()}, num_warps=case.num_warps,
                registers=result.registers, spill_bytes=result.spill_bytes, shared_bytes=result.shared_bytes,
                tensor_core_ops=result.tensor_core_ops, tf32=result.tf32, blocks_per_sm=result.blocks_per_sm(arch),
                occupancy=result.occupancy(arch))


def compile_all(archs=ARCHS, dtypes=DTYPES, allow_tf32: bool = False) -> list[dict]:
    """Every case for every arch, compiled in a child process (see the module docstring): report rows."""
    missing = backend_missing()
    if missing:
        raise RuntimeError(missing)
    cmd = [sys.executable, "-m", "kernels.aot", "--archs", *map(str, archs),
           "--dtypes", *(str(d).replace("torch.", "") for d in dtypes)] + (["--allow-tf32"] if allow_tf32 else [])
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"AOT compilation failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout)


def set_fp32_matmul_precision(precision: str) -> None:
    """Set torch's fp32 matmul precision for CUDA ("ieee" or "tf32") with one API, never both.

    torch >= 2.9 documents torch.backends.cuda.matmul.fp32_precision; mixing it with the legacy
    allow_tf32 flag makes torch's legacy getters raise, so the legacy flag is set only where the
    new attribute does not exist (torch < 2.9). This process is a child of compile_all, so the
    setting touches no caller's state.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = precision
    else:
        matmul.allow_tf32 = precision == "tf32"


def _main() -> None:
    p = argparse.ArgumentParser(description="Compile every kernel case for CUDA targets; print JSON rows.")
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    p.add_argument("--allow-tf32", action="store_true",
                   help='as if torch allowed TF32 for fp32 matmuls (torch.backends.fp32_precision = "tf32")')
    args = p.parse_args()
    set_fp32_matmul_precision("tf32" if args.allow_tf32 else "ieee")
    rows = [row(case, arch, compile_case(case, arch))
            for case in cases(tuple(getattr(torch, d) for d in args.dtypes)) for arch in args.archs]
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    _main()
