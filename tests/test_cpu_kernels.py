"""The C kernels (kernels/xnor_cpu.c, kernels/cpu.py) bit for bit against the
PyTorch references: every kernel this CPU runs forced by name (the reference,
scalar, AVX2, AVX-512, both vertical kernels, the VNNI plane kernel) on shapes
at every tile, block, word and lane edge and on unseen random shapes, with and
without bit planes, threshold outputs (by row class too), streamed outputs and
work buffers; each build
variant; the thread pool; the measured kernel choice and its cache; a
portable build where -march=native fails; kernels the CPU cannot run refused;
the fallback without a compiler and the build cache.  No timing is asserted."""
import ctypes
import json
import subprocess

import pytest
import torch
from hypothesis import given, settings, strategies as st

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


def assert_fires_as_reference(lib, a_words, b_words, k, planes, expected, kernel=None):
    """The C kernel's threshold epilogue against fire_torch on the expected
    dot products, with thresholds that some outputs reach exactly (ties)."""
    m, n = expected.shape
    threshold = expected[torch.arange(n) % m, torch.arange(n)].to(torch.int32)
    threshold[::3] += 1
    fired = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, planes, threshold, kernel=kernel)
    assert torch.equal(fired, bo.fire_torch(expected.to(torch.int32), threshold))


# The vertical kernels (AVX2, AVX-512) and the tile or Harley-Seal kernels of
# the same instruction set, forced by name, whether or not they would be
# chosen; skipped where the CPU cannot run them.
# (257, 2048 + 5, 300): a K tail, one block of 256 rows of B and 44 more;
# (300, 4096, 129): one panel of the epilogue and 1 column; (256, 2048, 1):
# one column; (260, 64 * 256, 40): the longest rows it takes (VERT_MAX_WORDS);
# (33, 784, 1000): MNIST's K (a short last word), tasks of a few rows;
# (5, 64, 7): one word; (70, 330, 771): 6 words (B is transposed 4 words at
# a time), two whole blocks of B stored straight into the output and a short
# one through the epilogue; (64, 448, 512): 7 words, whole blocks only.
VERTICAL_AND_TILES = ["avx2-vertical", "avx2", "avx512-vertical", "avx512"]


def runnable_kernel(lib, kernel):
    if kernel not in cpu_kernels.runnable_kernels(lib):
        pytest.skip(f"this CPU cannot run the {kernel} kernel")


@needs_c
@pytest.mark.parametrize("vertical", VERTICAL_AND_TILES)
@pytest.mark.parametrize("m,k,n", [(257, 2048 + 5, 300), (300, 4096, 129), (256, 2048, 1),
                                   (260, 64 * 256, 40), (33, 784, 1000), (5, 64, 7),
                                   (70, 330, 771), (64, 448, 512)])
def test_vertical_kernel_exact(vertical, m, k, n):
    lib = cpu_kernels.library()
    runnable_kernel(lib, vertical)
    a, b = random_operands(m, k, n, seed=m + k + n)
    a = rows_at_the_edges(a)
    a_words, b_words = bo.pack(a), bo.pack(b.T)
    expected = reference_matmul(a, b)
    out = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, 1, kernel=vertical)
    assert torch.equal(out.float(), expected)
    assert_fires_as_reference(lib, a_words, b_words, k, 1, expected, vertical)
    out = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, 1, kernel=vertical,
                                options=cpu_kernels.STREAM)  # non-temporal stores
    assert torch.equal(out.float(), expected)


@needs_c
@pytest.mark.parametrize("vertical", VERTICAL_AND_TILES)
@pytest.mark.parametrize("m,k,n", [(40, 784, 300), (3, 2048 + 7, 40)])
def test_vertical_kernel_bit_planes(vertical, m, k, n):
    """The first layer on 8 bit planes through the vertical kernel (forced on
    and off): plane p counted at level p of its counters, planes with more
    set bits than clear ones (all of a 255 image, none of a 0 image) on the
    counters of the other sign, counts of 17 and 18 bits."""
    lib = cpu_kernels.library()
    runnable_kernel(lib, vertical)
    gen = torch.Generator().manual_seed(k + n)
    pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
    pixels[0], pixels[1] = 255, 0
    pixels[2, : k // 3] = 0                             # MNIST-like: mostly background
    pixels[-1] = torch.arange(k) % 2 * 255              # every plane half set ...
    w = torch.where(torch.rand(n, k, generator=gen) < 0.5, 1.0, -1.0)
    w[0] = torch.where(pixels[-1] > 0, 1.0, -1.0)       # ... and matched: counts past 2^16
    planes, w_words = bo.bit_planes(pixels), bo.pack(w)
    expected = (2 * pixels.long() - 255) @ w.long().T
    out = cpu_kernels.xnor_gemm(lib, planes, w_words, k, 8, kernel=vertical)
    assert torch.equal(out.long(), expected)
    assert_fires_as_reference(lib, planes, w_words, k, 8, expected, vertical)


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
    isa = variant if variant in ("avx2", "avx512") else "scalar"
    out = cpu_kernels.xnor_gemm(lib, a_words, b_words, a.shape[1], 1, kernel=isa)
    assert torch.equal(out.float(), reference_matmul(a, b))
    if isa != "scalar":             # the vertical kernel of the build
        tall_a, tall_b = random_operands(40, 2048 + 3, 70, seed=12)
        out = cpu_kernels.xnor_gemm(lib, cpu_kernels.pack(lib, tall_a),
                                    cpu_kernels.pack(lib, tall_b.T.contiguous()), tall_a.shape[1],
                                    1, kernel=isa + "-vertical")
        assert torch.equal(out.float(), reference_matmul(tall_a, tall_b))

    pixels = torch.randint(0, 256, (9, 790), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    planes = cpu_kernels.pack_planes(lib, pixels)
    assert torch.equal(planes, bo.pack_planes_torch(pixels))
    w_words = bo.pack(b.T[:, :790].contiguous())
    d = cpu_kernels.xnor_gemm(lib, planes, w_words, 790, 8, kernel=isa)
    assert torch.equal(d.long(), (2 * pixels.long() - 255) @ sign64(b[:790]).long())
    threshold = d[0].clone()
    fired = cpu_kernels.xnor_gemm(lib, planes, w_words, 790, 8, threshold, kernel=isa)
    assert torch.equal(fired, bo.fire_torch(d, threshold))

    # the paths without work buffers (the copies of A and B, byte-sliced planes)
    none = cpu_kernels.NO_WORK_BUFFERS
    out = cpu_kernels.xnor_gemm(lib, a_words, b_words, a.shape[1], 1, kernel=isa, options=none)
    assert torch.equal(out.float(), reference_matmul(a, b))
    assert torch.equal(cpu_kernels.xnor_gemm(lib, planes, w_words, 790, 8, kernel=isa, options=none), d)

    # the output written by non-temporal stores (AVX2; what outputs larger
    # than the last-level cache get), with rows that start 32-byte aligned
    # (N = 136) and rows that do not (N = 131)
    for n in (131, 136):
        b_n = torch.cat([b, b[:, :5]], dim=1)[:, :n]
        out = cpu_kernels.xnor_gemm(lib, a_words, cpu_kernels.pack(lib, b_n.T.contiguous()),
                                    a.shape[1], 1, kernel=isa, options=cpu_kernels.STREAM)
        assert torch.equal(out.float(), reference_matmul(a, b_n))


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


# ---------------------------------------------------------------------------
# Every kernel by name; the measured choice; builds
# ---------------------------------------------------------------------------

KERNELS = ["reference", "scalar", "avx2", "avx2-vertical", "avx512", "avx512-vertical", "avx512-vnni"]
X86 = cpu_kernels.platform.machine() == "x86_64"


@pytest.fixture(scope="module")
def lib():
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("the C kernels did not build")
    return lib


def runnable(lib, kernel):
    if kernel not in cpu_kernels.runnable_kernels(lib):
        pytest.skip(f"this CPU cannot run the {kernel} kernel")


def sign_matrix(x):
    return torch.where(x >= 0, 1, -1).long()


def operands(m, k, n, seed, zeros=0.1):
    """A (m x k) and B^T (n x k) with exact zeros and negative zeros (+1)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    for x in (a, b):
        x[torch.rand(x.shape, generator=gen) < zeros] = 0.0
        x[torch.rand(x.shape, generator=gen) < zeros / 2] = -0.0
    return a, b


def fire(dots, threshold):
    """Packed threshold outputs by the definition: bit j of a row set where
    dot >= threshold[j]."""
    m, n = dots.shape
    bits = (dots >= threshold).long()
    words = torch.zeros(m, (n + 63) // 64, dtype=torch.int64)
    for j in range(n):
        words[:, j // 64] |= bits[:, j] << (j % 64)
    return words


def check_product(lib, kernel, a, b, options=0):
    """The kernel's dot products and threshold outputs against float64."""
    k = a.shape[1]
    expected = sign_matrix(a) @ sign_matrix(b).T
    a_words, b_words = bo.pack(a), bo.pack(b)
    out = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, 1, kernel=kernel, options=options)
    assert torch.equal(out.long(), expected)
    m, n = expected.shape
    if m and n:
        threshold = expected[torch.arange(n) % m, torch.arange(n)].to(torch.int32)   # ties
        threshold[::3] += 1
        fired = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, 1, threshold, kernel=kernel,
                                      options=options)
        assert torch.equal(fired, fire(expected, threshold))


# Shapes at the edges of every variant: one word, a short last word, the
# tile sizes (4 x 8, 4 x 2, 4 x 4), the blocks (MB = 32, NB = 128), the
# vertical kernels' 256 and 512 lanes (full, one over, one under), their 4
# words a transpose step and 256 words a row (the most they take), the
# Harley-Seal kernel from 32 words and its K slices of 124 words.
SHAPES = [(1, 1, 1), (3, 63, 5), (4, 64, 8), (5, 65, 9), (33, 200, 130), (64, 784, 512),
          (70, 330, 771), (65, 448, 513), (100, 784, 511), (64, 2048 + 5, 257), (9, 2240 - 5, 17),
          (5, 8192 + 130, 13), (66, 64 * 256, 40), (40, 64 * 256 + 1, 24)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_every_kernel_exact(lib, kernel, m, k, n):
    runnable(lib, kernel)
    a, b = operands(m, k, n, seed=m + 7 * k + 13 * n)
    a[0] = 1.0                      # all set: counted over the clear bits (vertical)
    if m > 2:
        a[1] = -1.0                 # none set
        a[2, : k // 2] = 1.0        # a tie
    if kernel.endswith("vertical") and (k + 63) // 64 > 256:
        with pytest.raises(ValueError, match="cannot take"):
            cpu_kernels.xnor_gemm(lib, bo.pack(a), bo.pack(b), k, 1, kernel=kernel)
        return
    check_product(lib, kernel, a, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("options", [cpu_kernels.STREAM, cpu_kernels.NO_WORK_BUFFERS])
def test_every_kernel_options(lib, kernel, options):
    """Outputs by non-temporal stores (rows 32-byte aligned or not) and the
    paths without work buffers (edge and plane kernels)."""
    runnable(lib, kernel)
    for m, k, n in [(37, 8192 + 333, 131), (70, 784, 136), (300, 2048, 600)]:
        a, b = operands(m, k, n, seed=k + n)
        check_product(lib, kernel, a, b, options)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (9, 790, 65), (40, 784, 300), (70, 784, 1024),
                                   (3, 2048 + 7, 40), (2, 8192 + 700, 11)])
def test_every_kernel_bit_planes(lib, kernel, m, k, n):
    """The first layer over 8 bit planes: all-255 and all-0 images (planes
    all set, none set), a half-set image matched by a row of B (counts past
    2^16), MNIST-like background."""
    runnable(lib, kernel)
    gen = torch.Generator().manual_seed(k + n)
    pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
    pixels[0] = 255
    if m > 2:
        pixels[1] = 0
        pixels[2, : k // 3] = 0
    pixels[-1] = torch.arange(k) % 2 * 255
    w = torch.where(torch.rand(n, k, generator=gen) < 0.5, 1.0, -1.0)
    w[0] = torch.where(pixels[-1] > 0, 1.0, -1.0)
    planes, w_words = bo.bit_planes(pixels), bo.pack(w)
    expected = (2 * pixels.long() - 255) @ w.long().T
    if kernel.endswith("vertical") and (k + 63) // 64 > 256:
        return
    for options in (0, cpu_kernels.NO_WORK_BUFFERS):
        d = cpu_kernels.xnor_gemm(lib, planes, w_words, k, 8, kernel=kernel, options=options)
        assert torch.equal(d.long(), expected)
    threshold = expected[torch.arange(n) % m, torch.arange(n)].to(torch.int32)
    threshold[1::2] -= 1
    fired = cpu_kernels.xnor_gemm(lib, planes, w_words, k, 8, threshold, kernel=kernel)
    assert torch.equal(fired, fire(expected, threshold))


def class_table(expected, row_class, classes):
    """A threshold table (classes x N int32) that the rows of each class
    reach exactly in places (ties), the rest one above or below: each
    class's thresholds from the expected dot products of one of its rows."""
    n = expected.shape[1]
    table = torch.zeros(classes, n, dtype=torch.int32)
    for c in range(classes):
        rows = (row_class == c).nonzero()[:, 0]
        row = expected[rows[0]] if len(rows) else torch.zeros(n, dtype=torch.int64)
        table[c] = (row + torch.arange(n) % 3 - 1).to(torch.int32)     # -1, tie, +1
    return table


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n,planes", [(1, 1, 1, 1), (40, 576, 130, 1), (70, 1152, 513, 1),
                                          (100, 36, 64, 8), (33, 790, 65, 8), (9, 2048 + 7, 257, 1)])
def test_every_kernel_fires_by_row_class(lib, kernel, m, k, n, planes):
    """Thresholds by row class (a conv layer's window classes): each output
    row tested against its class's row of the table, against the float64
    dot products; bit planes, N not a multiple of 64, ties in every class,
    a class with no row, and the table's row 0 where no class is given."""
    runnable(lib, kernel)
    gen = torch.Generator().manual_seed(m + k + n)
    if planes == 8:
        pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        a_words, expected_a = bo.bit_planes(pixels), 2 * pixels.long() - 255
    else:
        a = torch.randn(m, k, generator=gen)
        a_words, expected_a = bo.pack(a), sign_matrix(a)
    b = torch.randn(n, k, generator=gen)
    expected = expected_a @ sign_matrix(b).T
    row_class = torch.randint(0, 9, (m,), generator=gen).to(torch.uint8)
    row_class[0] = 8
    table = class_table(expected, row_class, 10)                    # class 9: no row
    fired = cpu_kernels.xnor_gemm(lib, a_words, bo.pack(b), k, planes, table, kernel=kernel,
                                  row_class=row_class)
    assert torch.equal(fired, fire(expected, table[row_class.long()]))
    fired = cpu_kernels.xnor_gemm(lib, a_words, bo.pack(b), k, planes, table, kernel=kernel)
    assert torch.equal(fired, fire(expected, table[0]))


def test_row_class_out_of_range_refused(lib, monkeypatch):
    """A class past the table, a class index of another type or count, a
    table that is not N int32 a class: one-line errors before any kernel
    reads them, on the C path and the pure-PyTorch path alike."""
    a, b = operands(6, 100, 70, seed=3)
    a_words, b_words = bo.pack(a), bo.pack(b)
    table = torch.zeros(3, 70, dtype=torch.int32)
    cases = [(table, torch.tensor([0, 1, 2, 3, 0, 0], dtype=torch.uint8), "class 3"),
             (table, torch.zeros(6, dtype=torch.int64), "uint8"),
             (table, torch.zeros(5, dtype=torch.uint8), "6 uint8"),
             (torch.zeros(3, 69, dtype=torch.int32), None, "70 entries a class"),
             (table.float(), None, "int32")]
    for pure_torch in ("0", "1"):
        monkeypatch.setenv("BINARYNET_PURE_TORCH", pure_torch)
        for threshold, row_class, words in cases:
            with pytest.raises(ValueError) as info:
                bo.xnor_fire_op(a_words, b_words, 100, 1, threshold, row_class)
            assert words in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="class 3"):
        cpu_kernels.xnor_gemm(lib, a_words, b_words, 100, 1, table, kernel="reference",
                              row_class=cases[0][1])


@needs_c
@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 140), k=st.integers(1, 1500), n=st.integers(1, 700),
       seed=st.integers(0, 2**31), zeros=st.sampled_from([0.0, 0.5, 1.0]),
       planes=st.sampled_from([1, 8]))
def test_every_kernel_on_unseen_shapes(m, k, n, seed, zeros, planes):
    """Random shapes (hypothesis), every kernel this CPU runs, the same
    operands: each equal to the float64 reference."""
    lib = cpu_kernels.library()
    gen = torch.Generator().manual_seed(seed)
    if planes == 8:
        pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        pixels[torch.rand(m, k, generator=gen) < zeros] = 0
        a_words, expected_a = bo.bit_planes(pixels), 2 * pixels.long() - 255
    else:
        a = torch.randn(m, k, generator=gen)
        a[torch.rand(m, k, generator=gen) < zeros] = 0.0
        a_words, expected_a = bo.pack(a), sign_matrix(a)
    b = torch.randn(n, k, generator=gen)
    expected = expected_a @ sign_matrix(b).T
    for kernel in cpu_kernels.runnable_kernels(lib):
        out = cpu_kernels.xnor_gemm(lib, a_words, bo.pack(b), k, planes, kernel=kernel)
        assert torch.equal(out.long(), expected), kernel


def test_kernels_run_where_the_cpu_has_their_features(lib):
    """bnn_kernel_runs (the C side's __builtin_cpu_supports) against the CPU
    flags of /proc/cpuinfo: an object runs only where every feature of its
    level is there."""
    if not X86:
        pytest.skip("x86 feature names")
    flags = set(cpu_kernels.cpu_signature().split())
    v2 = {"popcnt", "sse4_2", "ssse3"}
    v3 = v2 | {"avx", "avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "abm"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vpopcntdq"}
    needs = {"reference": set(), "scalar": v2, "avx2": v3, "avx2-vertical": v3, "avx512": v4,
             "avx512-vertical": v4, "avx512-vnni": v4 | {"avx512_vnni", "avx512vbmi", "gfni"}}
    runs = set(cpu_kernels.runnable_kernels(lib))
    for kernel, features in needs.items():
        assert (kernel in runs) == (features <= flags), kernel


def test_forced_kernel(lib, monkeypatch):
    """BINARYNET_KERNEL forces a kernel; an unknown name is an error."""
    a, b = operands(100, 784, 600, seed=1)
    expected = sign_matrix(a) @ sign_matrix(b).T
    calls = []
    real = lib.bnn_xnor_gemm_kernel

    class Spy:
        def __call__(self, kernel, *args):
            calls.append(kernel)
            return real(kernel, *args)

    for kernel in cpu_kernels.runnable_kernels(lib) + ["default"]:
        monkeypatch.setenv(cpu_kernels.KERNEL_ENV, kernel)
        monkeypatch.setattr(lib, "bnn_xnor_gemm_kernel", Spy())
        calls.clear()
        assert torch.equal(bo.xnor_matmul_packed(bo.pack(a), bo.pack(b), 784).long(), expected)
        names = cpu_kernels.kernel_names(lib)
        if kernel == "default":
            assert calls == [lib.bnn_default_kernel(100, 600, 784, 1)]
        else:
            assert calls == [names.index(kernel)]
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "no-such-kernel")
    with pytest.raises(ValueError, match="unknown kernel"):
        bo.xnor_matmul_packed(bo.pack(a), bo.pack(b), 784)


def test_default_table(lib):
    """The default table's choice is a kernel that runs here, vertical ones
    only from 64 rows of A and 4 words, with B not mostly padding."""
    names = cpu_kernels.kernel_names(lib)
    for m, k, n, planes in [(1, 64, 64, 1), (100, 784, 4096, 1), (10, 784, 1024, 8),
                            (100, 64 * 300, 512, 1), (300, 784, 300, 1), (100, 128, 4096, 1)]:
        kernel = names[lib.bnn_default_kernel(m, n, k, planes)]
        assert kernel in cpu_kernels.runnable_kernels(lib)
        if kernel.endswith("vertical"):
            assert m * planes >= 64 and 4 <= (k + 63) // 64 <= 256 and n != 300


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A copy of the source whose build and choice file go to a cache of the
    test's own, no forced kernel; the library loaded afresh before and after.
    Yields the copy."""
    source = tmp_path / "xnor_cpu.c"
    source.write_text(cpu_kernels.SOURCE.read_text())
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    monkeypatch.setenv("BINARYNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_kernels.KERNEL_ENV, raising=False)
    cpu_kernels._load.cache_clear()
    yield source
    cpu_kernels._load.cache_clear()


@needs_c
def test_choice_measured_cached_and_remeasured(tmp_path, monkeypatch, own_cache):
    """The first product of a class times the candidates and writes their
    order beside the library; a new process (a fresh load) reads it and
    measures nothing; an edited source is a new build and a new choice."""
    lib = cpu_kernels.library()
    a, b = operands(100, 784, 1000, seed=2)
    a_words, b_words = bo.pack(a), bo.pack(b)
    expected = sign_matrix(a) @ sign_matrix(b).T
    out = cpu_kernels.xnor_gemm(lib, a_words, b_words, 784, 1)
    assert torch.equal(out.long(), expected)
    files = list((tmp_path / "cache").glob("*.choice.json"))
    assert len(files) == 1
    order = json.loads(files[0].read_text())
    assert list(order) == ["rows 64-255 words 4-31 cols 512+ planes 1"]
    candidates = [k for k in cpu_kernels.runnable_kernels(lib)   # avx512-vnni: bit planes only
                  if k not in ("reference", "avx512-vnni")]
    assert sorted(order["rows 64-255 words 4-31 cols 512+ planes 1"]) == sorted(candidates)

    cpu_kernels._load.cache_clear()
    monkeypatch.setattr(cpu_kernels, "measure_order", lambda *args: pytest.fail("measured"))
    lib = cpu_kernels.library()
    assert torch.equal(cpu_kernels.xnor_gemm(lib, a_words, b_words, 784, 1).long(), expected)

    own_cache.write_text(own_cache.read_text() + "\n/* edited */\n")
    cpu_kernels._load.cache_clear()
    lib = cpu_kernels.library()
    with pytest.raises(pytest.fail.Exception):
        cpu_kernels.xnor_gemm(lib, a_words, b_words, 784, 1)


# The classes of product as docs/cpu_kernels.md documents them: rows of A
# (M x planes) 1-15, 16-63, 64-255, 256+; words of K 1-3, 4-31, 32-256,
# 257+; rows of B (N) 1-31, 32-191, 192-511, 512+; bit planes or not.
CLASSES = [((10000, 10, 1024, 1), "rows 256+ words 4-31 cols 1-31 planes 1"),
           ((100, 4096, 784, 1), "rows 64-255 words 4-31 cols 512+ planes 1"),
           ((1, 1, 1, 1), "rows 1-15 words 1-3 cols 1-31 planes 1"),
           ((15, 31, 192, 1), "rows 1-15 words 1-3 cols 1-31 planes 1"),
           ((16, 32, 193, 1), "rows 16-63 words 4-31 cols 32-191 planes 1"),
           ((63, 191, 64 * 31, 1), "rows 16-63 words 4-31 cols 32-191 planes 1"),
           ((64, 192, 64 * 31 + 1, 1), "rows 64-255 words 32-256 cols 192-511 planes 1"),
           ((255, 511, 64 * 256, 1), "rows 64-255 words 32-256 cols 192-511 planes 1"),
           ((256, 512, 64 * 256 + 1, 1), "rows 256+ words 257+ cols 512+ planes 1"),
           ((2, 64, 784, 8), "rows 16-63 words 4-31 cols 32-191 planes 8"),
           ((32, 1024, 784, 8), "rows 256+ words 4-31 cols 512+ planes 8")]


def test_product_classes_at_the_documented_edges(lib):
    """A product's class, by name, on both sides of every documented edge;
    products of one class share its number, products of two differ."""
    for (m, n, k, planes), name in CLASSES:
        assert cpu_kernels.class_name(lib, m, n, k, planes) == name, (m, n, k, planes)
    numbers = {name: set() for _, name in CLASSES}
    for shape, name in CLASSES:
        numbers[name].add(lib.bnn_product_class(*shape))
    assert all(len(n) == 1 for n in numbers.values())
    assert len(set.union(*numbers.values())) == len(numbers)
    assert len(set(cpu_kernels.class_names(lib))) == lib.bnn_class_count() == 2 * 4 * 4 * 4


@needs_c
def test_choice_of_another_class_layout_is_measured_again(monkeypatch, own_cache):
    """A choice file written under other class edges (a number a class, as
    before N made classes; a name of other edges): never read for a class,
    which is measured, and left out of the file when it is written."""
    lib = cpu_kernels.library()
    path = lib.binarynet_choices.path
    old = {str(c): ["scalar"] for c in range(32)}
    old["rows 64-255 words 4-31 planes 1"] = ["scalar"]
    path.write_text(json.dumps(old))
    cpu_kernels._load.cache_clear()
    lib = cpu_kernels.library()
    measured = []
    real = cpu_kernels.measure_order
    monkeypatch.setattr(cpu_kernels, "measure_order",
                        lambda *args: measured.append("measured") or real(*args))
    a, b = operands(100, 784, 10, seed=6)
    expected = sign_matrix(a) @ sign_matrix(b).T
    out = cpu_kernels.xnor_gemm(lib, bo.pack(a), bo.pack(b), 784, 1)
    assert torch.equal(out.long(), expected) and measured == ["measured"]
    written = json.loads(path.read_text())
    assert list(written) == ["rows 64-255 words 4-31 cols 1-31 planes 1"]
    assert sorted(written["rows 64-255 words 4-31 cols 1-31 planes 1"]) == sorted(
        k for k in cpu_kernels.runnable_kernels(lib) if not k.endswith(("reference", "vertical", "vnni")))
    cpu_kernels._load.cache_clear()
    monkeypatch.setattr(cpu_kernels, "measure_order", lambda *args: pytest.fail("measured"))
    lib = cpu_kernels.library()
    assert torch.equal(cpu_kernels.xnor_gemm(lib, bo.pack(a), bo.pack(b), 784, 1).long(), expected)


@pytest.mark.parametrize("n", [1, 10, 31, 33, 200])
def test_forced_and_chosen_kernels_exact_at_small_n(lib, monkeypatch, n):
    """Every kernel this CPU runs, forced by BINARYNET_KERNEL, and the
    measured choice, at few rows of B (the output layer's 10, the edges of
    the classes of N): dot products and threshold outputs against an int64
    recomputation."""
    a, b = operands(300, 1024 + 17, n, seed=n)
    expected = sign_matrix(a) @ sign_matrix(b).T
    threshold = expected[torch.arange(n) % 300, torch.arange(n)].to(torch.int32)
    threshold[::2] += 1
    for kernel in cpu_kernels.runnable_kernels(lib) + [""]:
        monkeypatch.setenv(cpu_kernels.KERNEL_ENV, kernel)
        out = bo.xnor_matmul_packed(bo.pack(a), bo.pack(b), a.shape[1])
        assert torch.equal(out.long(), expected), kernel
        fired = cpu_kernels.xnor_gemm(lib, bo.pack(a), bo.pack(b), a.shape[1], 1, threshold)
        assert torch.equal(fired, fire(expected, threshold)), kernel


@needs_c
def test_portable_build_where_native_fails(tmp_path, monkeypatch, capsys):
    """Where -march=native fails (some compilers on ARM), the kernels are
    built with portable flags, said once, and are exact."""
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu_kernels, "NATIVE_FLAGS", ["-march=no-such-cpu"])
    monkeypatch.setenv("BINARYNET_CACHE", str(tmp_path))
    cpu_kernels._load.cache_clear()
    try:
        lib = cpu_kernels.library()
        assert lib is not None
        err = capsys.readouterr().err
        assert err.count("portable flags") == 1 and err.count("\n") == 1
        assert cpu_kernels.runnable_kernels(lib) == ["reference", "scalar"]
        a, b = operands(70, 1000, 300, seed=3)
        check_product(lib, "scalar", a, b)
        check_product(lib, None, a, b)
    finally:
        cpu_kernels._load.cache_clear()


@needs_c
def test_portable_build_where_no_level_builds(tmp_path, monkeypatch, capsys):
    """x86 with a compiler that knows none of the objects' flags: the
    kernels are built with portable flags, said once, and are exact."""
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels, "X86_OBJECTS", {"avx2": ["-march=no-such-level"],
                                                     "avx512": ["-mno-such-flag"]})
    monkeypatch.setenv("BINARYNET_CACHE", str(tmp_path))
    cpu_kernels._load.cache_clear()
    try:
        lib = cpu_kernels.library()
        err = capsys.readouterr().err
        assert err.count("portable flags") == 1 and err.count("\n") == 1
        assert cpu_kernels.runnable_kernels(lib) == ["reference", "scalar"]
        a, b = operands(40, 300, 70, seed=5)
        check_product(lib, None, a, b)
    finally:
        cpu_kernels._load.cache_clear()


ISA_FLAGS = {"scalar": ["-march=x86-64-v2"], "avx2": ["-march=x86-64-v3"],
             "avx512": ["-march=x86-64-v4", "-mavx512vpopcntdq"]}


@needs_c
@pytest.mark.parametrize("isa", ISA_FLAGS)
def test_each_part_compiles_warning_free(tmp_path, isa):
    """The common part (portable) and each kernel object, -Wall -Wextra -Werror."""
    if not X86:
        pytest.skip("x86 levels")
    for part in (["-DBNN_PART_COMMON"], ["-DBNN_PART_KERNELS", f"-DBNN_ISA={isa}", *ISA_FLAGS[isa]]):
        subprocess.run(["gcc", "-O3", "-Wall", "-Wextra", "-Werror", "-fPIC", *part, "-c",
                        str(cpu_kernels.SOURCE), "-o", str(tmp_path / "x.o")], check=True)


@needs_c
def test_kernel_not_in_the_library_is_refused(tmp_path, monkeypatch):
    """A library without the AVX-512 object (a plain AVX2 build) reports its
    kernels as not running and refuses them, named or forced."""
    if not X86 or "avx2" not in cpu_kernels.cpu_signature().split():
        pytest.skip("needs an AVX2 CPU")
    path = tmp_path / "avx2.so"
    subprocess.run(["gcc", "-O2", "-march=x86-64-v3", "-shared", "-fPIC", "-pthread",
                    str(cpu_kernels.SOURCE), "-o", str(path)], check=True)
    lib = cpu_kernels.declare(ctypes.CDLL(str(path)))
    lib.binarynet_choices = cpu_kernels.Choices(tmp_path / "choice.json", cpu_kernels.class_names(lib))
    assert cpu_kernels.runnable_kernels(lib) == ["reference", "avx2", "avx2-vertical"]
    a, b = operands(8, 100, 9, seed=4)
    with pytest.raises(ValueError, match="cannot run"):
        cpu_kernels.xnor_gemm(lib, bo.pack(a), bo.pack(b), 100, 1, kernel="avx512")
    monkeypatch.setenv(cpu_kernels.KERNEL_ENV, "avx512-vertical")
    with pytest.raises(ValueError, match="cannot run"):
        cpu_kernels.xnor_gemm(lib, bo.pack(a), bo.pack(b), 100, 1)
    monkeypatch.delenv(cpu_kernels.KERNEL_ENV)
    check_product(lib, None, a, b)


@needs_c
def test_isa_cap_builds_what_an_avx2_cpu_gets(tmp_path, monkeypatch, capsys):
    """BINARYNET_ISA=avx2: a library of the scalar and AVX2 objects only (what
    a CPU without AVX-512 runs, its own build and choice), exact; an unknown
    value is said in one line and builds every object."""
    if not X86 or "avx2" not in cpu_kernels.cpu_signature().split():
        pytest.skip("needs an AVX2 CPU")
    monkeypatch.setenv("BINARYNET_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_kernels.KERNEL_ENV, raising=False)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx2")
    cpu_kernels._load.cache_clear()
    try:
        lib = cpu_kernels.library()
        assert cpu_kernels.runnable_kernels(lib) == ["reference", "scalar", "avx2", "avx2-vertical"]
        for m, k, n in [(70, 1000, 300), (300, 4096 + 5, 700)]:
            check_product(lib, None, *operands(m, k, n, seed=m))
        monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx9")
        assert list(cpu_kernels.x86_objects()) == list(cpu_kernels.X86_OBJECTS)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "BINARYNET_ISA=avx9 is not one of scalar, avx2, avx512" in err
    finally:
        cpu_kernels._load.cache_clear()
# ---------------------------------------------------------------------------
# B laid out once for a vertical kernel (make_layout, pack_weights)
# ---------------------------------------------------------------------------

VERTICAL = ["avx2-vertical", "avx512-vertical"]


def dots_and_a_words(m, k, planes, gen):
    """Rows of A (random signs, or 8-bit pixels as bit planes) and the int64
    factor of their dot products: sign(a), or 2 p - 255."""
    if planes == 8:
        pixels = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        return bo.bit_planes(pixels), 2 * pixels.long() - 255
    a = rows_at_the_edges(torch.randn(m, k, generator=gen)) if m >= 5 else torch.randn(m, k, generator=gen)
    return bo.pack(a), sign_matrix(a)


def check_layout_product(lib, kernel, m, k, n, planes, seed):
    """One B laid out once, used with two different A: plain products,
    streamed ones and fired bits by row class against the int64 reference
    and against the same kernel transposing B itself."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(n, k, generator=gen)
    b_words = bo.pack(b)
    layout = cpu_kernels.make_layout(lib, b_words, k, cpu_kernels.kernel_index(lib, kernel))
    assert layout is not None
    for _ in range(2):
        a_words, factor = dots_and_a_words(m, k, planes, gen)
        expected = factor @ sign_matrix(b).T
        for options in (0, cpu_kernels.STREAM):
            out = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, planes, kernel=kernel,
                                        options=options, layout=layout)
            assert torch.equal(out.long(), expected)
        unprepared = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, planes, kernel=kernel)
        assert torch.equal(out, unprepared)
        row_class = torch.randint(0, 3, (m,), generator=gen).to(torch.uint8)
        table = class_table(expected, row_class, 3)
        fired = cpu_kernels.xnor_gemm(lib, a_words, b_words, k, planes, table, kernel=kernel,
                                      row_class=row_class, layout=layout)
        assert torch.equal(fired, fire(expected, table[row_class.long()]))


# (1, 1, 1): one bit; (33, 784, 1000): MNIST's K, N not a multiple of 512;
# (70, 330, 771): 6 words (the transpose takes 4 at a time); (257, 2053, 300):
# a K tail, one block of 256 rows and 44 more; (5, 64 * 256, 513): the longest
# rows, one row past a 512-lane block; bit planes with a K tail.
@needs_c
@pytest.mark.parametrize("kernel", VERTICAL)
@pytest.mark.parametrize("m,k,n,planes", [(1, 1, 1, 1), (33, 784, 1000, 1), (70, 330, 771, 1),
                                          (257, 2048 + 5, 300, 1), (5, 64 * 256, 513, 1),
                                          (40, 784, 300, 8), (3, 2048 + 7, 40, 8)])
def test_layout_made_once_is_exact(lib, kernel, m, k, n, planes):
    runnable(lib, kernel)
    check_layout_product(lib, kernel, m, k, n, planes, seed=m + k + n)


@needs_c
@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 80), k=st.integers(1, 1500), n=st.integers(1, 1100),
       planes=st.sampled_from([1, 8]), seed=st.integers(0, 2 ** 16))
def test_layout_random_shapes(m, k, n, planes, seed):
    lib = cpu_kernels.library()
    for kernel in VERTICAL:
        if kernel in cpu_kernels.runnable_kernels(lib):
            check_layout_product(lib, kernel, m, k, n, planes, seed)


def assert_refused(call, words):
    with pytest.raises(ValueError) as info:
        call()
    assert words in str(info.value) and "\n" not in str(info.value)


@needs_c
def test_layout_refused_elsewhere(lib):
    """A layout used with another kernel, another N or K (even of the same
    size in bytes), a tile kernel, or a buffer make_layout did not write:
    one-line errors, no product.  Kernels that transpose nothing, and rows
    longer than the vertical kernels take, get no layout."""
    vertical = [v for v in VERTICAL if v in cpu_kernels.runnable_kernels(lib)]
    if not vertical:
        pytest.skip("this CPU runs no vertical kernel")
    index = {name: cpu_kernels.kernel_index(lib, name) for name in cpu_kernels.runnable_kernels(lib)}
    a, b = operands(4, 784, 1024, seed=5)
    a_words, b_words = bo.pack(a), bo.pack(b)
    layout = cpu_kernels.make_layout(lib, b_words, 784, index[vertical[-1]])
    gemm = lambda kernel, k=784, b=b_words, layout=layout: cpu_kernels.xnor_gemm(
        lib, a_words, b, k, 1, kernel=kernel, layout=layout)
    if len(vertical) == 2:      # 1024 rows: 4 x 256 or 2 x 512 lanes, the same bytes
        assert_refused(lambda: gemm(vertical[0]), f"made for kernel {vertical[1]!r}, N=1024, K=784")
    assert_refused(lambda: gemm(vertical[-1], k=780), "N=1024, K=784, not for")
    assert_refused(lambda: gemm(vertical[-1], b=b_words[:1000].contiguous()), "N=1024, K=784, not for")
    assert_refused(lambda: gemm("avx2"), "not for kernel 'avx2'")
    assert_refused(lambda: gemm(vertical[-1], layout=torch.zeros_like(layout)), "not a layout")
    assert cpu_kernels.make_layout(lib, b_words, 784, index["avx2"]) is None
    assert cpu_kernels.make_layout(lib, bo.pack(torch.ones(3, 64 * 257)), 64 * 257,
                                   index[vertical[-1]]) is None


@needs_c
def test_pack_weights_every_forced_kernel(lib, monkeypatch):
    """pack_weights: the product with every kernel forced (each laying the
    weights out for itself where it is vertical) and the measured choice
    equal the reference, into `out` too; the object keeps its own copy of
    the words, so changing them afterwards changes nothing; the fire op
    with the layout, by row class over bit planes."""
    a, b = operands(50, 784, 600, seed=6)
    a_words, b_words = bo.pack(a), bo.pack(b)
    expected = sign_matrix(a) @ sign_matrix(b).T
    weights = bo.pack_weights(b_words, 784)
    b_words.zero_()
    for kernel in cpu_kernels.runnable_kernels(lib) + [""]:
        monkeypatch.setenv(cpu_kernels.KERNEL_ENV, kernel)
        assert torch.equal(bo.xnor_matmul_packed(a_words, weights, 784).long(), expected)
        out = torch.empty(50, 600, dtype=torch.int32)
        assert bo.xnor_matmul_packed(a_words, weights, 784, out=out) is out
        assert torch.equal(out.long(), expected)
    made = [cpu_kernels.kernel_names(lib)[i] for i, x in weights._layouts.items() if x is not None]
    assert sorted(made) == sorted(v for v in VERTICAL if v in cpu_kernels.runnable_kernels(lib))
    gen = torch.Generator().manual_seed(7)
    planes, factor = dots_and_a_words(30, 784, 8, gen)
    expected = factor @ sign_matrix(b).T
    row_class = torch.randint(0, 2, (30,), generator=gen).to(torch.uint8)
    table = class_table(expected, row_class, 2)
    for kernel in VERTICAL + [""]:
        if kernel and kernel not in cpu_kernels.runnable_kernels(lib):
            continue
        monkeypatch.setenv(cpu_kernels.KERNEL_ENV, kernel)
        fired = bo.xnor_fire_op(planes, weights.words, 784, 8, table, row_class,
                                weights.layout_for(planes, 8))
        assert torch.equal(fired, fire(expected, table[row_class.long()]))


def test_pack_weights_refused_and_pure_torch(monkeypatch):
    """Weights of another K: one-line errors; without the C library the
    weights have no layout and the product is still exact."""
    a, b = operands(6, 200, 70, seed=8)
    weights = bo.pack_weights(bo.pack(b), 200)
    assert_refused(lambda: bo.pack_weights(bo.pack(b), 100), "K=100 packs into 2")
    assert_refused(lambda: bo.xnor_matmul_packed(bo.pack(a), weights, 199), "K=200, not K=199")
    monkeypatch.setenv("BINARYNET_PURE_TORCH", "1")
    assert weights.layout_for(bo.pack(a)) is None
    assert torch.equal(bo.xnor_matmul_packed(bo.pack(a), weights, 200).long(),
                       sign_matrix(a) @ sign_matrix(b).T)
