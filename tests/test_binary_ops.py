"""Tests of the 1-bit run time: binary_ops.py and the kernels in kernels/.

Every kernel path is compared bit for bit with a plain float64 reference
(sign(a) @ sign(b), sign(0) = +1): the tiled C kernel, the C baseline loop
nest, a portable build of the C file without popcount instructions, the
pure-PyTorch fallback and, on a GPU machine, the CUDA kernels.  The 1-bit
MNIST network is checked layer by layer against the float path and end to
end on the real test set (skipped where /work/shared/data/mnist is absent).
No timing is asserted.
"""
import ctypes
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import binary_ops as bo
from kernels import cpu as cpu_kernels
from kernels import cuda as cuda_kernels

REAL_MNIST = Path("/work/shared/data/mnist")
HAS_C = shutil.which("gcc") is not None
HAS_CUDA = torch.cuda.is_available()
needs_c = pytest.mark.skipif(not HAS_C, reason="no C compiler")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no GPU")
needs_mnist = pytest.mark.skipif(not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason="MNIST files absent")


# ---------------------------------------------------------------------------
# References and helpers
# ---------------------------------------------------------------------------

def sign64(x):
    return torch.where(x >= 0, 1.0, -1.0).double()


def reference_matmul(a, b):
    return (sign64(a.cpu()) @ sign64(b.cpu())).float()


def unpack(words, k):
    """Inverse of pack: +-1 float rows of length k."""
    bits = (words[..., None] >> torch.arange(64, device=words.device)) & 1
    bits = bits.reshape(*words.shape[:-1], -1)
    assert not bits[..., k:].any(), "padding bits must be 0"
    return bits[..., :k].float() * 2 - 1


def scale_pixels(pixels):
    """The network's input as mnist.py feeds it: 2 p / 255 - 1."""
    return 2 * pixels.reshape(len(pixels), -1).float() / 255 - 1


def random_operands(m, k, n, seed, zeros=0.1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    for x in (a, b):    # exact zeros (and negative zeros) must count as +1
        x[torch.rand(x.shape, generator=gen) < zeros] = 0.0
        x[torch.rand(x.shape, generator=gen) < zeros / 2] = -0.0
    return a.to(device), b.to(device)


@pytest.fixture(params=["c_tiled", "c_baseline", "torch"])
def cpu_path(request, monkeypatch):
    """Each CPU code path in turn, as the kernel argument of xnor_matmul."""
    if request.param.startswith("c_") and not HAS_C:
        pytest.skip("no C compiler")
    if request.param == "torch":
        monkeypatch.setenv("BINARYNET_PURE_TORCH", "1")
    return "baseline" if request.param == "c_baseline" else "xnor"


# ---------------------------------------------------------------------------
# Exactness of the GEMM on every path
# ---------------------------------------------------------------------------

SHAPES = [
    (1, 1, 1),          # K = 1
    (3, 63, 5), (4, 64, 4), (5, 65, 7),     # around one word
    (33, 200, 130),     # M, N past the block sizes (MB = 32, NB = 128)
    (12, 784, 203),     # MNIST's K: 13 words, 3 x 4 + 1 in the AVX2 copy of B; N % 4 = 3
    (163, 300, 389),    # 6 blocks of A x 4 panels of B: AVX2 tasks take runs of 2 or 3 blocks
    (7, 4096, 9),       # the paper's width; N % 8 = 1 column for the edge kernel
    (9, 2240 - 5, 17),  # 35 words: the AVX2 Harley-Seal kernel with 3 steps left over
    (6, 64 * 34 - 3, 9),  # 34 words: 2 left over, the odd one in pair form
    (4, 64 * 126 - 1, 12),  # a last K slice of 2 words: no group of 4, only the left-overs
    (5, 8192 + 130, 13),  # more than one K slice (KC = 124 words), the last one short
    (0, 10, 3), (3, 10, 0),
]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_xnor_matmul_exact(cpu_path, m, k, n):
    a, b = random_operands(m, k, n, seed=m + 7 * k + 13 * n)
    out = bo.xnor_matmul(a, b, kernel=cpu_path)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert torch.equal(out, reference_matmul(a, b))


@pytest.mark.parametrize("k", [64 * 31, 64 * 124, 64 * 124 + 64 * 35 - 9])
def test_xnor_matmul_counters_at_their_limit(cpu_path, k):
    """Rows of A that agree with rows of B everywhere, nowhere and half the
    time: the popcount of every word is 64 or 0, which fills the AVX2
    kernels' byte counters to their limit (31 words a call in the tile
    kernel, 31 groups of 4 words per K slice in the Harley-Seal kernel).
    Six rows of A, so that the 4-row tile kernel runs too."""
    a = torch.ones(6, k)
    a[1::3] = -1.0
    a[2::3, ::2] = -1.0
    b = torch.ones(k, 11)
    b[:, 1::2] = -1.0
    assert torch.equal(bo.xnor_matmul(a, b, kernel=cpu_path), reference_matmul(a, b))


def rows_at_the_edges(a):
    """Rows of A whose steps in the AVX2 vertical kernel are extreme: all +1
    (K set bits, counted over their clear bits: no step), all -1 (no set
    bit), exactly half set (a tie, counted over the set bits), one more
    (counted over the clear bits) and all but one (one step, over the clear
    bits)."""
    k = a.shape[1]
    a[0], a[1] = 1.0, -1.0
    a[2], a[3] = -1.0, -1.0
    a[2, : k // 2] = 1.0
    a[3, : k // 2 + 1] = 1.0
    a[4], a[4, -1] = 1.0, -1.0
    return a


def assert_fires_as_reference(lib, a_words, b_words, k, planes, expected):
    """The C kernel's threshold epilogue against fire_torch on the expected
    dot products, with thresholds that some outputs reach exactly (ties)."""
    m, n = expected.shape
    threshold = expected[torch.arange(n) % m, torch.arange(n)].to(torch.int32)
    threshold[::3] += 1
    fired = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, planes, threshold)
    assert torch.equal(fired, bo.fire_torch(expected.to(torch.int32), threshold))


# The AVX2 vertical kernel forced on (1) and off (0: the tile or the
# Harley-Seal kernel), whether or not it would be chosen (vertical_pays).
# (257, 2048 + 5, 300): a K tail, one block of 256 rows of B and 44 more;
# (300, 4096, 129): one panel of the epilogue and 1 column; (256, 2048, 1):
# one column; (260, 64 * 256, 40): the longest rows it takes (VERT_MAX_WORDS);
# (33, 784, 1000): MNIST's K (a short last word), tasks of a few rows;
# (5, 64, 7): one word; (70, 330, 771): 6 words (B is transposed 4 words at
# a time), two whole blocks of B stored straight into the output and a short
# one through the epilogue; (64, 448, 512): 7 words, whole blocks only.
@needs_c
@pytest.mark.parametrize("vertical", [1, 0])
@pytest.mark.parametrize("m,k,n", [(257, 2048 + 5, 300), (300, 4096, 129), (256, 2048, 1),
                                   (260, 64 * 256, 40), (33, 784, 1000), (5, 64, 7),
                                   (70, 330, 771), (64, 448, 512)])
def test_vertical_kernel_exact(vertical, m, k, n):
    lib = cpu_kernels.library()
    a, b = random_operands(m, k, n, seed=m + k + n)
    a = rows_at_the_edges(a)
    a_words, b_words = bo.pack(a), bo.pack(b.T)
    expected = reference_matmul(a, b)
    lib.bnn_use_vertical(vertical)
    try:
        assert torch.equal(cpu_kernels.xnor_gemm(lib, a_words, b_words, k, 1).float(), expected)
        assert_fires_as_reference(lib, a_words, b_words, k, 1, expected)
        lib.bnn_stream_outputs(1)           # non-temporal stores, as for large outputs
        assert torch.equal(cpu_kernels.xnor_gemm(lib, a_words, b_words, k, 1).float(), expected)
    finally:
        lib.bnn_use_vertical(-1)
        lib.bnn_stream_outputs(-1)


@needs_c
@pytest.mark.parametrize("vertical", [1, 0])
@pytest.mark.parametrize("m,k,n", [(40, 784, 300), (3, 2048 + 7, 40)])
def test_vertical_kernel_bit_planes(vertical, m, k, n):
    """The first layer on 8 bit planes through the vertical kernel (forced on
    and off): plane p counted at level p of its counters, planes with more
    set bits than clear ones (all of a 255 image, none of a 0 image) on the
    counters of the other sign, counts of 17 and 18 bits."""
    lib = cpu_kernels.library()
    gen = torch.Generator().manual_seed(k + n)
    pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
    pixels[0], pixels[1] = 255, 0
    pixels[2, : k // 3] = 0                             # MNIST-like: mostly background
    pixels[-1] = torch.arange(k) % 2 * 255              # every plane half set ...
    w = torch.where(torch.rand(n, k, generator=gen) < 0.5, 1.0, -1.0)
    w[0] = torch.where(pixels[-1] > 0, 1.0, -1.0)       # ... and matched: counts past 2^16
    planes, w_words = bo.bit_planes(pixels), bo.pack(w)
    expected = (2 * pixels.long() - 255) @ w.long().T
    lib.bnn_use_vertical(vertical)
    try:
        assert torch.equal(cpu_kernels.xnor_gemm(lib, planes, w_words, k, 8).long(), expected)
        assert_fires_as_reference(lib, planes, w_words, k, 8, expected)
    finally:
        lib.bnn_use_vertical(-1)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 140),
       seed=st.integers(0, 2**31), zeros=st.sampled_from([0.0, 0.3, 1.0]))
def test_xnor_matmul_exact_random_shapes(m, k, n, seed, zeros):
    a, b = random_operands(m, k, n, seed, zeros)
    expected = reference_matmul(a, b)
    assert torch.equal(bo.xnor_matmul(a, b), expected)
    if HAS_C:
        assert torch.equal(bo.xnor_matmul(a, b, kernel="baseline"), expected)


def test_pure_torch_path_matches(monkeypatch):
    a, b = random_operands(19, 150, 70, seed=3)
    monkeypatch.setenv("BINARYNET_PURE_TORCH", "1")
    assert cpu_kernels.library() is None
    assert torch.equal(bo.xnor_matmul(a, b), reference_matmul(a, b))


def test_no_compiler_warns_once_and_falls_back(monkeypatch, capsys):
    monkeypatch.setenv("CC", "no-such-compiler")
    cpu_kernels._load.cache_clear()
    try:
        a, b = random_operands(9, 100, 5, seed=4)
        assert torch.equal(bo.xnor_matmul(a, b), reference_matmul(a, b))
        assert torch.equal(bo.xnor_matmul(a, b), reference_matmul(a, b))
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pure-PyTorch" in err
    finally:
        cpu_kernels._load.cache_clear()


def test_packed_form_reused():
    a, b = random_operands(6, 300, 11, seed=5)
    b_words = bo.pack(b.T)
    for rows in (a, -a, a[:2]):
        out = bo.xnor_matmul_packed(bo.pack(rows), b_words, 300)
        assert out.dtype == torch.int32
        assert torch.equal(out.float(), reference_matmul(rows, b))


@pytest.mark.parametrize("pure_torch", [False, True])
def test_packed_product_into_out(monkeypatch, pure_torch):
    """out= (C and pure-PyTorch paths): the product lands in the given
    tensor, which is returned, and a second product overwrites the first."""
    if pure_torch:
        monkeypatch.setenv("BINARYNET_PURE_TORCH", "1")
    a, b = random_operands(37, 1000, 19, seed=6)
    b_words = bo.pack(b.T)
    out = torch.full((37, 19), 12345, dtype=torch.int32)
    for rows in (a, -a):
        assert bo.xnor_matmul_packed(bo.pack(rows), b_words, 1000, out=out) is out
        assert torch.equal(out.float(), reference_matmul(rows, b))


CPU_FLAGS = cpu_kernels.cpu_signature().split()
VARIANTS = {   # gcc flags, the popcount the build reports, the CPU flags it needs
    "portable": (["-march=x86-64"], "portable", []),
    "popcnt": (["-march=x86-64", "-mpopcnt"], "scalar popcnt", ["popcnt"]),
    "avx2": (["-march=x86-64", "-mpopcnt", "-mavx2"], "AVX2", ["avx2"]),
    "avx512": (["-march=x86-64", "-mavx512f", "-mavx512vpopcntdq"], "AVX-512",
               ["avx512f", "avx512_vpopcntdq"]),
}


@needs_c
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_micro_kernel_variant(tmp_path, variant):
    """Each #if branch of xnor_cpu.c, built explicitly and run where the CPU
    can, bit for bit against the reference: plain GEMM, bit planes, fire."""
    flags, kind, needs = VARIANTS[variant]
    if cpu_kernels.platform.machine() != "x86_64" or not set(needs) <= set(CPU_FLAGS):
        pytest.skip(f"this CPU cannot run the {variant} build")
    lib_path = tmp_path / f"{variant}.so"
    subprocess.run(["gcc", "-O2", *flags, "-shared", "-fPIC", "-pthread",
                    str(cpu_kernels.SOURCE), "-o", str(lib_path)], check=True)
    lib = cpu_kernels.declare(ctypes.CDLL(str(lib_path)))
    assert lib.bnn_popcount_kind().decode().startswith(kind)
    a, b = random_operands(37, 8192 + 333, 131, seed=11)
    a_words = cpu_kernels.pack(lib, a.contiguous())
    b_words = cpu_kernels.pack(lib, b.T.contiguous())
    assert torch.equal(a_words, bo.pack_torch(a))
    out = cpu_kernels.xnor_gemm(lib, a_words, b_words, a.shape[1], 1)
    assert torch.equal(out.float(), reference_matmul(a, b))
    lib.bnn_use_vertical(1)         # AVX2: the vertical kernel; elsewhere a no-op
    tall_a, tall_b = random_operands(40, 2048 + 3, 70, seed=12)
    out = cpu_kernels.xnor_gemm(lib, cpu_kernels.pack(lib, tall_a),
                                cpu_kernels.pack(lib, tall_b.T.contiguous()), tall_a.shape[1], 1)
    assert torch.equal(out.float(), reference_matmul(tall_a, tall_b))
    lib.bnn_use_vertical(-1)

    pixels = torch.randint(0, 256, (9, 790), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    planes = cpu_kernels.pack_planes(lib, pixels)
    assert torch.equal(planes, bo.pack_planes_torch(pixels))
    w_words = bo.pack(b.T[:, :790].contiguous())
    d = cpu_kernels.xnor_gemm(lib, planes, w_words, 790, 8)
    assert torch.equal(d.long(), (2 * pixels.long() - 255) @ sign64(b[:790]).long())
    threshold = d[0].clone()
    fired = cpu_kernels.xnor_gemm(lib, planes, w_words, 790, 8, threshold)
    assert torch.equal(fired, bo.fire_torch(d, threshold))

    # the paths without work buffers (the copies of A and B, byte-sliced planes)
    lib.bnn_use_work_buffers(0)
    try:
        out = cpu_kernels.xnor_gemm(lib, a_words, b_words, a.shape[1], 1)
        assert torch.equal(out.float(), reference_matmul(a, b))
        assert torch.equal(cpu_kernels.xnor_gemm(lib, planes, w_words, 790, 8), d)
    finally:
        lib.bnn_use_work_buffers(1)

    # the output written by non-temporal stores (AVX2; what outputs larger
    # than the last-level cache get), with rows that start 32-byte aligned
    # (N = 136) and rows that do not (N = 131)
    lib.bnn_stream_outputs(1)
    try:
        for n in (131, 136):
            b_n = torch.cat([b, b[:, :5]], dim=1)[:, :n]
            out = cpu_kernels.xnor_gemm(lib, a_words, cpu_kernels.pack(lib, b_n.T.contiguous()),
                                        a.shape[1], 1)
            assert torch.equal(out.float(), reference_matmul(a, b_n))
    finally:
        lib.bnn_stream_outputs(-1)


@needs_c
@pytest.mark.parametrize("flags", [["-march=native", "-Wall", "-Wextra", "-Werror"],
                                   ["-march=x86-64", "-mavx512f", "-mavx512vpopcntdq", "-Werror"]])
def test_c_source_compiles(tmp_path, flags):
    """Compile-only check of each #if branch (the AVX-512 VPOPCNTDQ one cannot
    run on a CPU without it)."""
    if "-mavx512f" in flags and cpu_kernels.platform.machine() != "x86_64":
        pytest.skip("x86 only")
    subprocess.run(["gcc", "-O3", *flags, "-shared", "-fPIC", "-pthread",
                    str(cpu_kernels.SOURCE), "-o", str(tmp_path / "x.so")], check=True)


# ---------------------------------------------------------------------------
# Bit planes and the threshold epilogue of the C kernel vs their PyTorch form
# ---------------------------------------------------------------------------

# (45, 300, 400): 12 blocks of plane rows x 4 panels, which AVX2 tasks take in
# runs of 3 or 4 blocks, the last one short
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 784, 65), (9, 100, 200), (4, 130, 64),
                                   (45, 300, 400)])
def test_bit_planes_and_fire(cpu_path, m, k, n):
    gen = torch.Generator().manual_seed(k + n)
    pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
    pixels[0, :3] = torch.tensor([0, 255, 128], dtype=torch.uint8)[: min(3, k)]
    w = torch.where(torch.rand(n, k, generator=gen) < 0.5, 1.0, -1.0)
    planes = bo.bit_planes(pixels)
    assert planes.shape == (8 * m, bo.words(k))
    bits = (unpack(planes, k).view(m, 8, k) + 1) / 2
    assert torch.equal((bits * 2 ** torch.arange(8.0)[:, None]).sum(1), pixels.float())

    d = bo._xnor_gemm_op(planes, bo.pack(w), k, 8)
    expected = (2 * pixels.long() - 255) @ w.long().T     # 255 * (x . w), x = 2p/255 - 1
    assert torch.equal(d.long(), expected)

    threshold = expected[torch.arange(n) % m, torch.arange(n)].to(torch.int32)  # exact ties
    threshold[::3] += 1
    fired = bo._xnor_fire_op(planes, bo.pack(w), k, 8, threshold)
    assert fired.shape == (m, bo.words(n))
    assert torch.equal(unpack(fired, n), torch.where(expected >= threshold, 1.0, -1.0))


@pytest.mark.parametrize("m,k,n", [(3, 2560 + 300, 13), (2, 8192 + 700, 11)])
def test_bit_planes_long_rows(cpu_path, m, k, n):
    """The plane kernels past their byte-counter chunk (10 words for the AVX2
    plane tile kernel) and past one K slice (128 words), with units left
    over after the 8-wide tiles for the single-row kernel."""
    gen = torch.Generator().manual_seed(k)
    pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
    pixels[0] = 255                                   # all planes set: largest counts
    w = torch.where(torch.rand(n, k, generator=gen) < 0.5, 1.0, -1.0)
    w[0] = -1.0
    d = bo._xnor_gemm_op(bo.bit_planes(pixels), bo.pack(w), k, 8)
    assert torch.equal(d.long(), (2 * pixels.long() - 255) @ w.long().T)


@needs_c
def test_threads_pool_concurrent_calls_and_large_output():
    """The C thread pool serves calls made at once from several Python threads
    (ctypes drops the GIL), and a result of several MiB (advised onto huge
    pages) is exact."""
    import threading
    a, b = random_operands(1100, 70, 1030, seed=8)     # 4.5 MB int32 result
    expected = reference_matmul(a, b)
    results = [None] * 6

    def run(i):
        results[i] = bo.xnor_matmul(a, b)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)


@needs_c
def test_threads_pool_in_forked_child():
    """A child forked after the pool started gets a pool of its own."""
    import multiprocessing
    a, b = random_operands(40, 300, 200, seed=9)
    assert torch.equal(bo.xnor_matmul(a, b), reference_matmul(a, b))   # pool running
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as child:
        out = child.apply(bo.xnor_matmul, (a, b))
    assert torch.equal(out, reference_matmul(a, b))


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (3, 1), (2, 64), (5, 65), (2, 3, 130), (7, 4096)])
def test_pack_round_trip(cpu_path, shape):
    x = torch.randn(shape)
    x.view(-1)[::5] = 0.0
    x.view(-1)[1::7] = -0.0
    words = bo.pack(x)
    assert words.dtype == torch.int64 and words.shape == (*shape[:-1], bo.words(shape[-1]))
    assert torch.equal(unpack(words, shape[-1]), torch.where(x >= 0, 1.0, -1.0))
    assert torch.equal(words, bo.pack_torch(x.reshape(-1, shape[-1])).view(words.shape))


def test_pack_float64_tiny_negatives():
    """float64 values that round to -0.0 in float32 keep their sign."""
    x = torch.tensor([[-1e-300, 1e-300, -0.0, 0.0, -5e-46, 2.0]], dtype=torch.float64)
    assert torch.equal(unpack(bo.pack(x), 6), torch.tensor([[-1.0, 1, 1, 1, -1, 1]]))
    assert torch.equal(bo.xnor_matmul(x, x.T), torch.tensor([[6.0]]))


def test_pack_bit_order():
    x = -torch.ones(1, 130)
    x[0, [0, 63, 64, 129]] = 1.0
    words = bo.pack(x)[0].tolist()
    assert words == [1 | -(1 << 63), 1, 2]


def test_pack_accepts_other_float_dtypes():
    x = torch.randn(4, 70, dtype=torch.float64)
    assert torch.equal(bo.pack(x), bo.pack(x.half()))


# ---------------------------------------------------------------------------
# Errors: one line, the right type
# ---------------------------------------------------------------------------

ERRORS = [
    (lambda: bo.pack([1.0, 2.0]), TypeError, "torch.Tensor"),
    (lambda: bo.pack(torch.ones(3, dtype=torch.int32)), TypeError, "floating-point"),
    (lambda: bo.pack(torch.ones(3, 0)), ValueError, "non-empty"),
    (lambda: bo.xnor_matmul(torch.ones(3), torch.ones(3, 2)), ValueError, "2-D"),
    (lambda: bo.xnor_matmul(torch.ones(2, 3), torch.ones(4, 2)), ValueError, "inner dimensions"),
    (lambda: bo.xnor_matmul(torch.ones(2, 3), torch.ones(3, 2, device="meta")), ValueError, "devices"),
    (lambda: bo.xnor_matmul(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.int64)), TypeError, "b must"),
    (lambda: bo.xnor_matmul(torch.ones(2, 3), torch.ones(3, 2), kernel="fast"), ValueError, "kernel"),
    (lambda: bo.xnor_matmul_packed(torch.ones(2, 1, dtype=torch.int64),
                                   torch.ones(2, 2, dtype=torch.int64), 64), ValueError, "words per row"),
    (lambda: bo.xnor_matmul_packed(torch.ones(2, 1, dtype=torch.int32),
                                   torch.ones(2, 1, dtype=torch.int64), 64), TypeError, "int64"),
    (lambda: bo.xnor_matmul_packed(torch.ones(2, 1, dtype=torch.int64),
                                   torch.ones(2, 1, dtype=torch.int64), 0), ValueError, "positive"),
    (lambda: bo.bit_planes(torch.ones(2, 3)), TypeError, "uint8"),
]
ONES_WORDS = torch.ones(2, 1, dtype=torch.int64)
ERRORS += [
    (lambda: bo.xnor_matmul_packed(ONES_WORDS, ONES_WORDS, 64, out=torch.ones(2, 2)),
     TypeError, "32-bit integer"),
    (lambda: bo.xnor_matmul_packed(ONES_WORDS, ONES_WORDS, 64, out=torch.ones(2, 3, dtype=torch.int32)),
     ValueError, "shape (2, 2)"),
    (lambda: bo.xnor_matmul_packed(ONES_WORDS, ONES_WORDS, 64, out=torch.ones(2, 4, dtype=torch.int32)[:, ::2]),
     ValueError, "not contiguous"),
]


@pytest.mark.parametrize("call,error,words", ERRORS)
def test_error_messages(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert words in message and "\n" not in message


# ---------------------------------------------------------------------------
# Threshold folding: batch norm + sign as one integer comparison
# ---------------------------------------------------------------------------

def make_layer(n_out, n_in, seed, trained_like=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    weight = torch.rand(n_out, n_in, generator=gen) * 2 - 1
    if trained_like:    # batch statistics of +-1 inputs: mean ~ 0, var ~ fan-in
        bias, mean = 0.01 * r(n_out), n_in ** 0.5 * r(n_out)
        var = n_in * (0.5 + torch.rand(n_out, generator=gen))
        gamma, beta = 1 + 0.3 * r(n_out), 0.3 * r(n_out)
    else:
        bias, mean = r(n_out), 10 * r(n_out)
        var = torch.rand(n_out, generator=gen) * 100
        gamma, beta = r(n_out), r(n_out)
    gamma[:4] = torch.tensor([0.0, 0.0, -0.0, -1.5])
    beta[:4] = torch.tensor([0.0, -0.25, -1.0, 0.0])
    # exact ties: BN output is exactly 0 at an integer accumulator
    mean[4:8], bias[4:8], beta[4:8], gamma[4:6] = torch.tensor([3.0, -5.0, 0.0, 2.0]), 0.0, 0.0, 1.0
    gamma[6:8] = -2.0
    gamma[8], var[8], beta[8] = 1e-30, 1e6, -1e-37   # extremes of float32
    return bo.Layer(weight, bias, bo.BatchNorm(gamma, beta, mean, torch.rsqrt(var + bo.BN_EPS)))


@pytest.mark.parametrize("trained_like", [False, True])
@pytest.mark.parametrize("k", [1, 64, 4096])
def test_fold_threshold_every_accumulator(k, trained_like):
    """For every possible accumulator d in [-K, K] the folded test
    direction * d >= t is the float path's sign(BN(d + bias))."""
    layer = make_layer(40, k, seed=k, trained_like=trained_like)
    direction, t = bo.fold_threshold(layer, lambda d: d.float(), k)
    d = torch.arange(-k, k + 1)[:, None]
    expected = layer.bn(d.float() + layer.bias) >= 0
    assert torch.equal(direction * d >= t, expected)


def test_fold_threshold_cases():
    layer = make_layer(10, 16, seed=0)
    direction, t = bo.fold_threshold(layer, lambda d: d.float(), 16)
    assert t[0] == -16 and t[1] == 17             # gamma = 0: always +1 (beta = 0), never
    assert t[4] == 3 and direction[4] == 1        # tie at d = 3 decides +1
    assert direction[6] == -1 and t[6] == 0       # gamma < 0: +1 for d <= 0


@pytest.mark.parametrize("trained_like", [False, True])
def test_hidden_layer_matches_float_path(trained_like):
    layers = [make_layer(96, 784, 1), make_layer(200, 96, 2, trained_like), make_layer(10, 200, 3)]
    xnor_net, float_net = bo.XnorMLP(layers), bo.FloatMLP(layers)
    gen = torch.Generator().manual_seed(4)
    x = torch.where(torch.rand(300, 96, generator=gen) < 0.5, 1.0, -1.0)
    expected = bo.binarize(float_net.hidden(1, x))
    assert torch.equal(unpack(xnor_net.hidden[0].fire(bo.pack(x)), 200), expected)


def test_first_layer_bit_planes_match_float_path():
    layers = [make_layer(130, 784, 5, trained_like=True), make_layer(10, 130, 6)]
    xnor_net, float_net = bo.XnorMLP(layers), bo.FloatMLP(layers)
    gen = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (500, 784), dtype=torch.uint8, generator=gen)
    pixels[:, ::3] = 0
    d = xnor_net.first.accumulate(bo.bit_planes(pixels))
    w = bo.binarize(layers[0].weight) * torch.where(layers[0].bn.gamma >= 0, 1.0, -1.0)[:, None]
    assert torch.equal(d.long(), (2 * pixels.long() - 255) @ w.long().T)   # 255 (x . w), exact
    expected = bo.binarize(float_net.hidden(0, bo.centered_pixels(pixels)))
    assert torch.equal(unpack(xnor_net.first.fire(bo.bit_planes(pixels)), 130), expected)


def test_network_predictions_match_on_random_pixels(cpu_path):
    layers = [make_layer(70, 784, 8, True), make_layer(70, 70, 9, True),
              make_layer(70, 70, 10, True), make_layer(10, 70, 11, True)]
    pixels = torch.randint(0, 256, (64, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    xnor_scores, float_scores = bo.XnorMLP(layers)(pixels), bo.FloatMLP(layers)(pixels)
    assert torch.equal(xnor_scores, float_scores)


# ---------------------------------------------------------------------------
# --infer end to end, and the command line's errors
# ---------------------------------------------------------------------------

def save_network(path, hidden, pixels, seed=0):
    """A random network with batch-norm statistics taken from real images
    (so activations are balanced, as in a trained network)."""
    rng = np.random.default_rng(seed)
    arrays, n_in, x = {}, 784, scale_pixels(pixels)
    for i, n_out in enumerate([hidden, hidden, hidden, 10], 1):
        weight = rng.uniform(-1, 1, (n_out, n_in)).astype(np.float32)
        bias = rng.normal(0, 0.1, n_out).astype(np.float32)
        pre = x @ bo.binarize(torch.as_tensor(weight)).T + torch.as_tensor(bias)
        gamma = rng.normal(1, 0.5, n_out).astype(np.float32)
        gamma[:2] = [0.0, -1.0]
        beta = rng.normal(0, 0.3, n_out).astype(np.float32)
        arrays.update({f"dense{i}.weight": weight, f"dense{i}.bias": bias,
                       f"bn{i}.weight": gamma, f"bn{i}.bias": beta,
                       f"bn{i}.running_mean": pre.mean(0).numpy(),
                       f"bn{i}.running_inv_std": torch.rsqrt(pre.var(0) + bo.BN_EPS).numpy()})
        bn = bo.BatchNorm(*(torch.as_tensor(arrays[f"bn{i}.{p}"]) for p in bo.BN_KEYS))
        x, n_in = bo.binarize(bn(pre)), n_out
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def mnist_test():
    datasets = importlib.import_module("datasets")
    X, y = datasets.load_mnist(REAL_MNIST, download=False)["test"]
    return torch.as_tensor(X).reshape(len(X), -1), torch.as_tensor(y)


@needs_mnist
def test_infer_end_to_end(tmp_path, mnist_test, capsys):
    npz, out = tmp_path / "net.npz", tmp_path / "infer.json"
    save_network(npz, 256, mnist_test[0][:1000])
    assert bo.main(["--infer", str(npz), "--data-dir", str(REAL_MNIST), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"float_err", "xnor_err", "identical", "float_ms", "xnor_ms",
            "bytes_32bit", "bytes_1bit"} <= set(result)
    assert result["identical"] is True and result["float_err"] == result["xnor_err"]
    assert result["bytes_1bit"] < result["bytes_32bit"] / 20
    assert "predictions identical: yes" in capsys.readouterr().out


@needs_mnist
def test_float_path_agrees_with_mnist_build_model(tmp_path, mnist_test):
    """The lead's model (mnist.build_model) in eval mode predicts as FloatMLP.
    It adds the bias inside F.linear and may compute batch norm as a fused
    scale and shift, so scores differ by rounding; predictions must agree."""
    mnist = pytest.importorskip("mnist")
    if not hasattr(mnist, "build_model"):
        pytest.skip("mnist.build_model not written yet")
    arrays = save_network(tmp_path / "net.npz", 256, mnist_test[0][:1000])
    model = mnist.build_model(256)
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()},
                                                strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    model.eval()
    pixels = mnist_test[0][:2000]
    with torch.no_grad():
        theirs = model(scale_pixels(pixels).view(-1, 1, 28, 28)).argmax(1)
    ours = bo.FloatMLP(bo.load_parameters(tmp_path / "net.npz"))(pixels).argmax(1)
    assert (theirs != ours).sum() <= 2


def bad_npz_files(tmp_path):
    good = {f"dense{i}.weight": np.zeros((4, 784 if i == 1 else 4), np.float32) for i in range(1, 5)}
    good |= {f"dense{i}.bias": np.zeros(4, np.float32) for i in range(1, 5)}
    good |= {f"bn{i}.{p}": np.ones(4, np.float32) for i in range(1, 5) for p in bo.BN_KEYS}
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    np.savez(tmp_path / "keys.npz", **{k: v for k, v in good.items() if k != "bn3.running_inv_std"})
    np.savez(tmp_path / "shape.npz", **(good | {"dense2.weight": np.zeros((4, 5), np.float32)}))
    np.savez(tmp_path / "vector.npz", **(good | {"bn1.bias": np.zeros(5, np.float32)}))
    return {"missing": tmp_path / "missing.npz", "corrupt": tmp_path / "corrupt.npz",
            "keys": tmp_path / "keys.npz", "shape": tmp_path / "shape.npz",
            "vector": tmp_path / "vector.npz"}


@pytest.mark.parametrize("case", ["missing", "corrupt", "keys", "shape", "vector"])
def test_infer_bad_parameters(tmp_path, capsys, case):
    path = bad_npz_files(tmp_path)[case]
    assert bo.main(["--infer", str(path), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binary_ops: error:") and err.count("\n") == 1


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "binary_ops.py"), "--infer",
                             str(tmp_path / "nope.npz"), "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@needs_mnist
def test_infer_missing_data_dir(tmp_path, capsys):
    pytest.importorskip("datasets")
    npz = tmp_path / "net.npz"
    save_network(npz, 16, torch.zeros(10, 784, dtype=torch.uint8))
    assert bo.main(["--infer", str(npz), "--data-dir", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------------------
# The build cache and the custom ops' registration
# ---------------------------------------------------------------------------

@needs_c
def test_build_cache_rebuilds_on_source_change(tmp_path, monkeypatch):
    source = tmp_path / "xnor_cpu.c"
    source.write_text(cpu_kernels.SOURCE.read_text())
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    monkeypatch.setenv("BINARYNET_CACHE", str(tmp_path / "cache"))
    first = cpu_kernels.build("gcc")
    assert cpu_kernels.build("gcc") == first and first.exists()
    source.write_text(source.read_text() + "\n/* edited */\n")
    second = cpu_kernels.build("gcc")
    assert second != first and second.exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, second.name])


@needs_c
def test_bench_rows(capsys):
    rows = bo.bench_shape("cpu", 33, 200, 70)
    assert [r["kernel"] for r in rows] == ["baseline", "blas", "xnor"]
    for r in rows:
        assert {"device", "M", "K", "N", "kernel", "ms", "gops"} <= set(r) and r["ms"] > 0
    bo.print_bench_table(rows)
    assert "timed on 8 of 33 rows" in capsys.readouterr().out


@needs_cuda
def test_bench_rows_cuda():
    rows = bo.bench_shape("cuda", 33, 200, 70)
    kernels = [r["kernel"] for r in rows]
    assert kernels[:3] == ["baseline", "blas", "xnor"]
    if cuda_kernels.has_tensor_core_xnor(torch.device("cuda")):
        assert kernels[3:] == ["xnor_popc"]


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where no GPU exists")
@pytest.mark.parametrize("mode", [["--bench"], ["--infer", "p.npz"]])
def test_device_cuda_without_gpu_is_one_line_error(capsys, mode):
    assert bo.main(mode + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "binary_ops: error: --device cuda: no CUDA GPU is visible to PyTorch\n"


def test_custom_ops_registered():
    a, b = random_operands(5, 70, 3, seed=2)
    a_words, b_words = bo.pack(a), bo.pack(b.T)
    torch.library.opcheck(bo._pack_op, (a.contiguous(),))
    torch.library.opcheck(bo._xnor_gemm_op, (a_words, b_words, 70, 1))
    torch.library.opcheck(bo._xnor_gemm_out_op,
                          (a_words, b_words, 70, torch.empty(len(a), b.shape[1], dtype=torch.int32)))
    out = torch.ops.binarynet.xnor_gemm(a_words, b_words, 70, 1)
    assert torch.equal(out.float(), reference_matmul(a, b))


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


@needs_cuda
def test_cuda_network_matches_cpu():
    layers = [make_layer(100, 784, 8, True), make_layer(100, 100, 9, True),
              make_layer(100, 100, 10, True), make_layer(10, 100, 11, True)]
    pixels = torch.randint(0, 256, (300, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cpu_scores = bo.XnorMLP(layers)(pixels)
    cuda_net = bo.XnorMLP([layer.to("cuda") for layer in layers])
    assert torch.equal(cuda_net(pixels.cuda()).cpu(), cpu_scores)
    assert torch.equal(bo.bit_planes(pixels.cuda()).cpu(), bo.bit_planes(pixels))


def test_parameters_with_pytorch_running_var_are_converted_with_a_note(tmp_path, capsys):
    """An .npz saved before batch norm kept Lasagne's inv_std holds bnN.running_var, which
    such a model evaluated as 1 / sqrt(var + eps): loaded as that inv_std, with a note."""
    gen = torch.Generator().manual_seed(3)
    arrays = save_network(tmp_path / "new.npz", 64, torch.randint(0, 256, (200, 784), dtype=torch.uint8,
                                                                   generator=gen))
    old = {k.replace("running_inv_std", "running_var"): (1 / v.astype(np.float64) ** 2 - bo.BN_EPS
                                                          if k.endswith("running_inv_std") else v)
           for k, v in arrays.items()}
    np.savez(tmp_path / "old.npz", **old)
    new_layers, old_layers = bo.load_parameters(tmp_path / "new.npz"), bo.load_parameters(tmp_path / "old.npz")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "running_var" in err and "converted" in err
    for a, b in zip(new_layers, old_layers):
        torch.testing.assert_close(b.bn.inv_std, a.bn.inv_std, rtol=1e-6, atol=0)
    pixels = torch.randint(0, 256, (500, 784), dtype=torch.uint8, generator=gen)
    assert torch.equal(bo.FloatMLP(new_layers)(pixels).argmax(1), bo.FloatMLP(old_layers)(pixels).argmax(1))
