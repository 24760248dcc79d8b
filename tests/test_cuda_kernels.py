"""The CUDA kernels (kernels/*.cu, kernels/cuda.py): compiled by nvcc wherever it
exists; run, bit for bit against the float64 reference, where a GPU exists."""
import shutil
import subprocess

import pytest
import torch

import binary_ops as bo
from helpers import ROOT, SHAPES, needs_cuda, random_operands, reference_matmul
from kernels import cuda as cuda_kernels


# ---------------------------------------------------------------------------
# CUDA: compile-only everywhere nvcc exists; run where a GPU exists
# ---------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted((ROOT / "kernels").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_source_compiles(tmp_path, source):
    subprocess.run(["nvcc", "-c", "-arch=sm_80", str(source), "-o", str(tmp_path / "k.o")],
                   check=True, capture_output=True)


@needs_cuda
@pytest.mark.parametrize("m,k,n", SHAPES + [(130, 1000, 70), (64, 64, 64)])
@pytest.mark.parametrize("kernel", ["xnor", "baseline"])
def test_cuda_matmul_exact(m, k, n, kernel):
    a, b = random_operands(m, k, n, seed=m + k + n, device="cuda")
    out = bo.xnor_matmul(a, b, kernel=kernel)
    assert out.is_cuda and torch.equal(out.cpu(), reference_matmul(a, b))


CUDA_XNOR_SHAPES = SHAPES + [(130, 1000, 70), (64, 64, 64), (257, 4097, 129), (300, 20000, 260)]


@needs_cuda
@pytest.mark.parametrize("m,k,n", CUDA_XNOR_SHAPES)
@pytest.mark.parametrize("name", ["xnor_gemm_tc", "xnor_gemm"])
def test_cuda_xnor_kernels_exact(m, k, n, name):
    """Each CUDA XNOR kernel forced in turn: tails of M, N (tiles of 128 and
    64) and K (stages of 512 bits), K beyond one stage, both fragments."""
    if name == "xnor_gemm_tc" and not cuda_kernels.has_tensor_core_xnor(torch.device("cuda")):
        pytest.skip("no 1-bit tensor-core instruction before compute capability 8.0")
    a, b = random_operands(m, k, n, seed=3 * m + k + n, device="cuda")
    out = cuda_kernels.xnor_gemm(bo.pack(a), bo.pack(b.T.contiguous()), k, name=name)
    assert torch.equal(out.float().cpu(), reference_matmul(a, b))


@needs_cuda
@pytest.mark.parametrize("name", ["xnor_gemm_tc", "xnor_gemm"])
def test_cuda_xnor_kernels_extremes(name):
    """All-agreeing and all-differing rows (every bit set in one operand):
    the row popcounts of the tensor-core form at their largest."""
    if name == "xnor_gemm_tc" and not cuda_kernels.has_tensor_core_xnor(torch.device("cuda")):
        pytest.skip("no 1-bit tensor-core instruction before compute capability 8.0")
    k = 1000
    a = torch.ones(130, k, device="cuda")
    a[1::2] = -1
    b = torch.ones(k, 70, device="cuda")
    b[:, 1::3] = -1
    out = cuda_kernels.xnor_gemm(bo.pack(a), bo.pack(b.T.contiguous()), k, name=name)
    assert torch.equal(out.float().cpu(), reference_matmul(a, b))


@needs_cuda
@pytest.mark.parametrize("rows,k", [(1, 1), (3, 31), (5, 64), (7, 65), (33, 790), (1000, 4096 + 3)])
def test_cuda_packing_kernels(rows, k):
    """pack.cu's three kernels bit for bit against the PyTorch versions:
    signs (zeros, -0.0 and NaN included), thresholds and bit planes."""
    gen = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, k, generator=gen)
    x.view(-1)[::5], x.view(-1)[1::7], x.view(-1)[2::11] = 0.0, -0.0, float("nan")
    assert torch.equal(cuda_kernels.pack(x.cuda()).cpu(), bo.pack_torch(x))
    d = torch.randint(-50, 50, (rows, k), dtype=torch.int32, generator=gen)
    threshold = torch.randint(-50, 50, (k,), dtype=torch.int32, generator=gen)
    assert torch.equal(cuda_kernels.fire(d.cuda(), threshold.cuda()).cpu(), bo.fire_torch(d, threshold))
    pixels = torch.randint(0, 256, (rows, k), dtype=torch.uint8, generator=gen)
    assert torch.equal(cuda_kernels.pack_planes(pixels.cuda()).cpu(), bo.pack_planes_torch(pixels))


@needs_cuda
def test_cuda_packed_product_into_out():
    a, b = random_operands(70, 1000, 90, seed=9, device="cuda")
    out = torch.zeros(70, 90, dtype=torch.int32, device="cuda")
    assert bo.xnor_matmul_packed(bo.pack(a), bo.pack(b.T), 1000, out=out) is out
    assert torch.equal(out.float().cpu(), reference_matmul(a, b))
