"""The C kernels (kernels/xnor_cpu.c, kernels/cpu.py) bit for bit against the
PyTorch references: each micro-kernel variant, the AVX2 vertical kernel forced on
and off, the bit planes and the threshold epilogue, the thread pool, a portable
build without popcount instructions, the fallback without a compiler and the
build cache.  No timing is asserted."""
import ctypes
import subprocess

import pytest
import torch

import binary_ops as bo
from helpers import needs_c, random_operands, reference_matmul, sign64, unpack
from kernels import cpu as cpu_kernels


# ---------------------------------------------------------------------------
# The vertical kernel, every popcount variant, the PyTorch fallback
# ---------------------------------------------------------------------------

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

    d = bo.xnor_gemm_op(planes, bo.pack(w), k, 8)
    expected = (2 * pixels.long() - 255) @ w.long().T     # 255 * (x . w), x = 2p/255 - 1
    assert torch.equal(d.long(), expected)

    threshold = expected[torch.arange(n) % m, torch.arange(n)].to(torch.int32)  # exact ties
    threshold[::3] += 1
    fired = bo.xnor_fire_op(planes, bo.pack(w), k, 8, threshold)
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
    d = bo.xnor_gemm_op(bo.bit_planes(pixels), bo.pack(w), k, 8)
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
