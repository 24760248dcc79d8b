"""Compile and launch the CUDA kernels of kernels/*.cu.

The sources are compiled at first use with NVRTC through
torch.cuda._compile_kernel, for the compute capability of the current GPU,
so nothing is built where no GPU exists.
"""
import functools
from pathlib import Path

import torch

HERE = Path(__file__).parent
TILE_XNOR = 64        # BM = BN in xnor_gemm.cu
TILE_BASELINE = 16    # TILE in baseline_gemm.cu
BLOCK = (16, 16, 1)


@functools.cache
def kernel(name: str):
    """The kernel `name` compiled from kernels/`name`.cu, once per process."""
    source = (HERE / f"{name}.cu").read_text()
    return torch.cuda._compile_kernel(source, name)


def grid(rows: int, cols: int, tile: int) -> tuple[int, int, int]:
    return ((cols + tile - 1) // tile, (rows + tile - 1) // tile, 1)


def launch(name: str, tile: int, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, k: int):
    """Run kernel `name` (args: a, b, out, M, N, K) over the M x N output,
    one block of 16 x 16 threads per tile x tile outputs; returns out."""
    m, n = out.shape
    if m and n:
        with torch.cuda.device(out.device):
            kernel(name)(grid=grid(m, n, tile), block=BLOCK, args=[a, b, out, m, n, k])
    return out


def xnor_gemm(a: torch.Tensor, b: torch.Tensor, k: int, out=None) -> torch.Tensor:
    """a: M x KW words, b: N x KW words, contiguous CUDA int64.  M x N int32,
    in `out` if given (contiguous, checked by the caller)."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    return launch("xnor_gemm", TILE_XNOR, a, b, out, k)


def baseline_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: M x K, b: K x N contiguous CUDA float32.  a @ b by the 16 x 16 kernel."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    return launch("baseline_gemm", TILE_BASELINE, a, b, out, a.shape[1])
