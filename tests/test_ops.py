"""The ops' specification (binary_ops.py): pack's layout, xnor_matmul and
xnor_matmul_packed exact against a plain float64 reference on every CPU path
(the tiled C kernel, the C baseline loop nest, the pure-PyTorch fallback),
one-line errors of the right type, and the torch.library ops registered."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import binary_ops as bo
from helpers import HAS_C, SHAPES, random_operands, reference_matmul, unpack


# ---------------------------------------------------------------------------
# Exactness of the GEMM on every path
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n", SHAPES)
def test_xnor_matmul_exact(cpu_path, m, k, n):
    a, b = random_operands(m, k, n, seed=m + 7 * k + 13 * n)
    out = bo.xnor_matmul(a, b, kernel=cpu_path)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert torch.equal(out, reference_matmul(a, b))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 140),
       seed=st.integers(0, 2**31), zeros=st.sampled_from([0.0, 0.3, 1.0]))
def test_xnor_matmul_exact_random_shapes(m, k, n, seed, zeros):
    a, b = random_operands(m, k, n, seed, zeros)
    expected = reference_matmul(a, b)
    assert torch.equal(bo.xnor_matmul(a, b), expected)
    if HAS_C:
        assert torch.equal(bo.xnor_matmul(a, b, kernel="baseline"), expected)


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
# The fused GEMM-and-threshold op, by row class
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (12, 200, 70), (30, 576, 128)])
def test_xnor_fire_by_row_class(cpu_path, m, k, n):
    """xnor_fire with a threshold table and a class per row against float64
    sign products, ties included; its old form (N thresholds) unchanged."""
    a, b = random_operands(m, k, n, seed=m + k + n)
    expected = reference_matmul(a, b)
    gen = torch.Generator().manual_seed(n)
    row_class = torch.randint(0, 4, (m,), generator=gen).to(torch.uint8)
    table = (expected[torch.arange(4) % m] + torch.arange(n) % 3 - 1).to(torch.int32)
    a_words, b_words = bo.pack(a), bo.pack(b.T)
    fired = bo.xnor_fire_op(a_words, b_words, k, 1, table, row_class)
    assert torch.equal(unpack(fired, n), torch.where(expected >= table[row_class.long()], 1.0, -1.0))
    fired = bo.xnor_fire_op(a_words, b_words, k, 1, table[1].contiguous())
    assert torch.equal(unpack(fired, n), torch.where(expected >= table[1], 1.0, -1.0))


# ---------------------------------------------------------------------------
# The custom ops' registration
# ---------------------------------------------------------------------------

def test_custom_ops_registered():
    a, b = random_operands(5, 70, 3, seed=2)
    a_words, b_words = bo.pack(a), bo.pack(b.T)
    torch.library.opcheck(bo.pack_op, (a.contiguous(),))
    torch.library.opcheck(bo.xnor_gemm_op, (a_words, b_words, 70, 1))
    torch.library.opcheck(bo.xnor_fire_op, (a_words, b_words, 70, 1, torch.zeros(2, 3, dtype=torch.int32),
                                            torch.tensor([1, 0, 1, 1, 0], dtype=torch.uint8)))
    torch.library.opcheck(bo.xnor_gemm_out_op,
                          (a_words, b_words, 70, torch.empty(len(a), b.shape[1], dtype=torch.int32)))
    out = torch.ops.binarynet.xnor_gemm(a_words, b_words, 70, 1)
    assert torch.equal(out.float(), reference_matmul(a, b))
