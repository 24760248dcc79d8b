"""Compile and launch the CUDA kernels of kernels/*.cu.

The sources are compiled at first use with NVRTC through
torch.cuda._compile_kernel, for the compute capability of the current GPU,
so nothing is built where no GPU exists.

pack.cu packs signs, thresholded accumulators and bit planes.  Of the two
XNOR kernels, xnor_gemm_tc.cu (the tensor cores' 1-bit instruction) runs
where the GPU has it, from compute capability 8.0; xnor_gemm.cu (__popcll
on the ordinary cores) runs on older GPUs, and on request (tests, --bench).
"""
import functools
from pathlib import Path

import torch

from kernels import words

HERE = Path(__file__).parent
# name -> (output tile: BM = BN in its .cu, threads per block)
LAUNCH = {"xnor_gemm_tc": (128, (256, 1, 1)),
          "xnor_gemm": (64, (16, 16, 1)),
          "baseline_gemm": (16, (16, 16, 1))}


@functools.cache
def kernel(name: str, file: str | None = None):
    """The kernel `name` compiled from kernels/`file`.cu (default: the
    file of the same name), once per process."""
    source = (HERE / f"{file or name}.cu").read_text()
    return torch.cuda._compile_kernel(source, name)


def grid(rows: int, cols: int, tile: int) -> tuple[int, int, int]:
    return ((cols + tile - 1) // tile, (rows + tile - 1) // tile, 1)


def launch(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, k: int):
    """Run kernel `name` (args: a, b, out, M, N, K) over the M x N output,
    one block per tile x tile outputs; returns out."""
    m, n = out.shape
    tile, block = LAUNCH[name]
    if m and n:
        with torch.cuda.device(out.device):
            kernel(name)(grid=grid(m, n, tile), block=block, args=[a, b, out, m, n, k])
    return out


PACK_WARPS = 8   # WARPS in pack.cu: one warp per output word


def launch_pack(name: str, n_words: int, out: torch.Tensor, args: list) -> torch.Tensor:
    """Run pack.cu's kernel `name` with one warp per word, n_words warps;
    returns out."""
    blocks = (n_words + PACK_WARPS - 1) // PACK_WARPS
    if blocks:
        with torch.cuda.device(out.device):
            kernel(name, "pack")(grid=(blocks, 1, 1), block=(32 * PACK_WARPS, 1, 1), args=args)
    return out


def pack(x: torch.Tensor) -> torch.Tensor:
    """x: rows x K contiguous CUDA float32.  Its signs packed, rows x KW int64."""
    rows, k = x.shape
    out = torch.empty(rows, words(k), dtype=torch.int64, device=x.device)
    return launch_pack("pack_signs", out.numel(), out, [x, out, rows, k])


def fire(d: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """d: rows x N int32 accumulators, threshold: N int32, contiguous CUDA.
    The packed activations d >= threshold, rows x NW int64."""
    rows, n = d.shape
    out = torch.empty(rows, words(n), dtype=torch.int64, device=d.device)
    return launch_pack("fire", out.numel(), out, [d, threshold, out, rows, n])


def pack_planes(pixels: torch.Tensor) -> torch.Tensor:
    """pixels: rows x K contiguous CUDA uint8.  Their 8 bit planes packed,
    8 rows x KW int64 (row 8 i + p: bit p of row i)."""
    rows, k = pixels.shape
    out = torch.empty(8 * rows, words(k), dtype=torch.int64, device=pixels.device)
    # a warp per word of an image row writes that word of all 8 planes
    return launch_pack("pack_planes", rows * words(k), out, [pixels, out, rows, k])


@functools.cache
def has_tensor_core_xnor(device: torch.device) -> bool:
    """mma.sync m16n8k256 .b1 .and.popc needs compute capability 8.0 (asked
    once per device: every XNOR product on the GPU passes here)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def xnor_gemm(a: torch.Tensor, b: torch.Tensor, k: int, out=None, name=None) -> torch.Tensor:
    """a: M x KW words, b: N x KW words, contiguous CUDA int64.  M x N int32,
    in `out` if given (contiguous, checked by the caller).  `name` forces a
    kernel ("xnor_gemm_tc" or "xnor_gemm")."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    if name is None:
        name = "xnor_gemm_tc" if has_tensor_core_xnor(a.device) else "xnor_gemm"
    return launch(name, a, b, out, k)


def baseline_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: M x K, b: K x N contiguous CUDA float32.  a @ b by the 16 x 16 kernel."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    return launch("baseline_gemm", a, b, out, a.shape[1])
