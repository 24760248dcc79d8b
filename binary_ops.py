"""BinaryNet's 1-bit run time (Courbariaux et al. 2016, arXiv 1602.02830,
section "Run-time" and the MNIST inference it reports).

A trained BNN multiplies matrices of +-1.  Packing 64 signs into a word turns a
dot product of K values into K - 2 * popcount(a XOR b): bits that agree count
+1, bits that differ -1.  This module is the PyTorch face of the hand-written
kernels in kernels/ (C on the CPU, CUDA on the GPU), exposed as torch.library
custom ops, and the 1-bit MNIST network built on them.

Packed layout (one convention everywhere): `pack` packs the last dimension;
element k lives in bit k % 64 (bit 0 least significant) of int64 word k // 64;
the bit is 1 for x >= 0 (sign(0) = +1) and 0 for x < 0; the unused high bits of
the last word are 0.  A GEMM a @ b packs the rows of a and the columns of b,
i.e. pack(a) and pack(b.T): both operands are packed along K.

Command line:
    python binary_ops.py --bench [--json PATH] [--device cpu|cuda]
    python binary_ops.py --infer mnist_parameters.npz --data-dir DIR [--json PATH] [--device cpu|cuda]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import binary_net
from kernels import cpu as cpu_kernels
from kernels import cuda as cuda_kernels

WORD_BITS = 64
BN_EPS = binary_net.BN_EPSILON   # the reference's batch-norm epsilon
PIXEL_BITS = 8          # MNIST pixels are 8-bit fixed point


def words(k: int) -> int:
    """Number of 64-bit words that hold k packed signs."""
    return (k + WORD_BITS - 1) // WORD_BITS


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Deterministic binarization with H = 1: the training code's own sign(x), with
    sign(0) = +1, so that both halves of the project share one convention."""
    return binary_net.sign(x)


# ---------------------------------------------------------------------------
# Plain PyTorch versions of the kernels.  They run where no C compiler
# exists and are the readable statement of what the hand-written kernels
# compute (the tests compare each kernel with them).
# ---------------------------------------------------------------------------

def pack_torch(x: torch.Tensor) -> torch.Tensor:
    """Sign-and-pack the rows of a 2-D float tensor (layout: module doc)."""
    rows, k = x.shape
    bits = torch.zeros(rows, words(k) * WORD_BITS, dtype=torch.int64, device=x.device)
    bits[:, :k] = x >= 0
    shifts = torch.arange(WORD_BITS, device=x.device)
    return (bits.view(rows, words(k), WORD_BITS) << shifts).sum(-1)


def popcount_torch(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each int64 word, by the classic SWAR bit counting (sums
    of 2-, 4-, then 8-bit fields).  The masks drop the sign bits that the
    arithmetic right shifts of negative words bring in, and int64 adds and
    subtracts wrap like the unsigned arithmetic this is usually written in."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def xnor_gemm_torch(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """M x N XNOR dot products of packed rows a (M x KW) and b (N x KW)."""
    rows_per_step = max(1, (1 << 22) // max(1, b.numel()))
    out = [k - 2 * popcount_torch(a_rows[:, None, :] ^ b[None]).sum(-1)
           for a_rows in a.split(rows_per_step)]
    return torch.cat(out).to(torch.int32) if out else a.new_empty(0, b.shape[0], dtype=torch.int32)


def pack_planes_torch(pixels: torch.Tensor) -> torch.Tensor:
    """The 8 bit planes of uint8 rows (M x K), packed: row 8 i + n holds bit n
    of row i, read as +-1 (bit set where the pixel's bit n is 1)."""
    shifts = torch.arange(PIXEL_BITS, dtype=torch.uint8, device=pixels.device)
    planes = (pixels[:, None, :] >> shifts[:, None]) & 1
    return pack_torch(planes.view(-1, pixels.shape[1]).float() - 0.5)


def combine_planes(d: torch.Tensor, planes: int) -> torch.Tensor:
    """sum_n 2^n d[planes i + n] for each output row i (Horner's rule)."""
    if planes == 1:
        return d
    d = d.view(d.shape[0] // planes, planes, d.shape[1])
    out = d[:, planes - 1].clone()
    for n in reversed(range(planes - 1)):
        out = 2 * out + d[:, n]
    return out


def fire_torch(d: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Packed activations: +1 where the accumulator d reaches the threshold."""
    return pack_torch(torch.where(d >= threshold, 1.0, -1.0))


# ---------------------------------------------------------------------------
# Custom ops: the dispatch point between the C kernels, the CUDA kernels and
# the PyTorch fallback.  They take contiguous tensors; the public functions
# below check and reshape the user's input.  `planes` > 1 combines groups of
# rows of `a` as bit planes (the first layer); `threshold` turns the dot
# products into the next layer's packed input (the hidden layers).
#
# They are defined with torch.library's low-level API (define, impl,
# register_fake) rather than torch.library.custom_op, whose Python wrappers
# (autograd, default filling, aliasing checks) cost 60-90 us a call against
# ~6 us here: a tenth of a 100-row XNOR product.  None of them has a
# gradient; their outputs are integer tensors.
# ---------------------------------------------------------------------------

_LIB = torch.library.Library("binarynet", "DEF")


def _op(schema: str, cpu, cuda, fake):
    """Define binarynet::<schema> with its CPU, CUDA and fake (shape-only)
    implementations; returns the op."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, cpu, "CPU")
    _LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"binarynet::{name}", fake, lib=_LIB)
    return getattr(torch.ops.binarynet, name).default


def _pack_cpu(x):
    lib = cpu_kernels.library()
    return pack_torch(x) if lib is None else cpu_kernels.pack(lib, x)


_pack_op = _op("pack(Tensor x) -> Tensor", _pack_cpu, cuda_kernels.pack,
               lambda x: x.new_empty(x.shape[0], words(x.shape[1]), dtype=torch.int64))


def _pack_planes_cpu(pixels):
    lib = cpu_kernels.library()
    return pack_planes_torch(pixels) if lib is None else cpu_kernels.pack_planes(lib, pixels)


_pack_planes_op = _op(
    "pack_planes(Tensor pixels) -> Tensor", _pack_planes_cpu, cuda_kernels.pack_planes,
    lambda pixels: pixels.new_empty(PIXEL_BITS * pixels.shape[0], words(pixels.shape[1]),
                                    dtype=torch.int64))


def _xnor_gemm_cpu(a, b, k, planes):
    lib = cpu_kernels.library()
    if lib is None:
        return combine_planes(xnor_gemm_torch(a, b, k), planes)
    return cpu_kernels.xnor_gemm(lib, a, b, k, planes)


_xnor_gemm_op = _op(
    "xnor_gemm(Tensor a, Tensor b, int k, int planes) -> Tensor", _xnor_gemm_cpu,
    lambda a, b, k, planes: combine_planes(cuda_kernels.xnor_gemm(a, b, k), planes),
    lambda a, b, k, planes: a.new_empty(a.shape[0] // planes, b.shape[0], dtype=torch.int32))


def _xnor_gemm_out_cpu(a, b, k, out):
    lib = cpu_kernels.library()
    if lib is None:
        out.copy_(xnor_gemm_torch(a, b, k))
    else:
        cpu_kernels.xnor_gemm(lib, a, b, k, 1, out=out)


def _xnor_gemm_out_cuda(a, b, k, out):
    cuda_kernels.xnor_gemm(a, b, k, out=out)


_xnor_gemm_out_op = _op(
    "xnor_gemm_out(Tensor a, Tensor b, int k, Tensor(a!) out) -> ()", _xnor_gemm_out_cpu,
    _xnor_gemm_out_cuda, lambda a, b, k, out: None)


def _xnor_fire_cpu(a, b, k, planes, threshold):
    lib = cpu_kernels.library()
    if lib is None:
        return fire_torch(_xnor_gemm_op(a, b, k, planes), threshold)
    return cpu_kernels.xnor_gemm(lib, a, b, k, planes, threshold)


_xnor_fire_op = _op(
    "xnor_fire(Tensor a, Tensor b, int k, int planes, Tensor threshold) -> Tensor", _xnor_fire_cpu,
    lambda a, b, k, planes, threshold: cuda_kernels.fire(_xnor_gemm_op(a, b, k, planes), threshold),
    lambda a, b, k, planes, threshold: a.new_empty(a.shape[0] // planes, words(b.shape[0]),
                                                   dtype=torch.int64))


def _baseline_gemm_cpu(a, b):
    lib = cpu_kernels.library()
    if lib is None:
        raise RuntimeError("the baseline kernel is C code and no C compiler was found")
    return cpu_kernels.baseline_gemm(lib, a, b)


_baseline_gemm_op = _op("baseline_gemm(Tensor a, Tensor b) -> Tensor", _baseline_gemm_cpu,
                        cuda_kernels.baseline_gemm,
                        lambda a, b: a.new_empty(a.shape[0], b.shape[1]))


# ---------------------------------------------------------------------------
# Public matrix functions, with one-line errors for user mistakes.
# ---------------------------------------------------------------------------

def _check_tensor(name, x, dtypes, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be a {what} tensor, got {x.dtype}")


def _check_matrix(name, x, dtypes, what):
    _check_tensor(name, x, dtypes, what)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")


def _check_same_device(a, b):
    if a.device != b.device:
        raise ValueError(f"operands are on different devices: {a.device} and {b.device}")


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pack(x: torch.Tensor) -> torch.Tensor:
    """Sign-and-pack x along its last dimension into int64 words (layout in
    the module doc): a (..., K) float tensor becomes (..., ceil(K / 64))."""
    _check_tensor("x", x, FLOATS, "floating-point")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if x.dtype == torch.float64:   # a tiny negative would round to -0.0, read as +1
        x = torch.where(x >= 0, 1.0, -1.0)
    flat = x.reshape(-1, k).to(torch.float32).contiguous()
    return _pack_op(flat).view(*x.shape[:-1], words(k))


def xnor_matmul_packed(a_words: torch.Tensor, b_words: torch.Tensor, k: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The XNOR-popcount GEMM on packed operands: the M x N int32 matrix of
    dot products sign(a) @ sign(b), given a_words = pack(a) (M x KW) and
    b_words = pack(b.T) (N x KW).  Pack once, multiply many times; with
    `out` (a contiguous M x N int32 tensor), the result is written there,
    and repeated products pay no allocation."""
    _check_matrix("a_words", a_words, (torch.int64,), "packed int64")
    _check_matrix("b_words", b_words, (torch.int64,), "packed int64")
    _check_same_device(a_words, b_words)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, w in (("a_words", a_words), ("b_words", b_words)):
        if w.shape[1] != words(k):
            raise ValueError(f"{name} has {w.shape[1]} words per row, but K={k} packs into {words(k)}")
    if out is None:
        return _xnor_gemm_op(a_words.contiguous(), b_words.contiguous(), k, 1)
    _check_tensor("out", out, (torch.int32,), "32-bit integer")
    _check_same_device(a_words, out)
    shape = (a_words.shape[0], b_words.shape[0])
    if tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int32 tensor of shape {shape}, "
                         f"got shape {tuple(out.shape)}" + ("" if out.is_contiguous() else ", not contiguous"))
    _xnor_gemm_out_op(a_words.contiguous(), b_words.contiguous(), k, out)
    return out


def _check_operands(a, b):
    _check_matrix("a", a, FLOATS, "floating-point")
    _check_matrix("b", b, FLOATS, "floating-point")
    _check_same_device(a, b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {a.shape[0]}x{a.shape[1]}, "
                         f"b is {b.shape[0]}x{b.shape[1]}")
    if a.shape[1] == 0:
        raise ValueError("K = 0: the operands have no inner dimension")


def baseline_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 by the unoptimized loop-nest kernel (the paper's
    baseline): kernels/xnor_cpu.c on the CPU, kernels/baseline_gemm.cu on CUDA."""
    _check_operands(a, b)
    return _baseline_gemm_op(a.float().contiguous(), b.float().contiguous())


def xnor_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str = "xnor") -> torch.Tensor:
    """sign(a) @ sign(b) as a float32 M x N matrix for float a (M x K) and
    b (K x N); exact while K <= 2^24, where float32 holds every integer.
    kernel="xnor" packs both and runs the XNOR GEMM; kernel="baseline"
    multiplies the signs with the baseline float kernel."""
    _check_operands(a, b)
    if kernel == "baseline":
        return baseline_matmul(binarize(a.float()), binarize(b.float()))
    if kernel != "xnor":
        raise ValueError(f"kernel must be 'xnor' or 'baseline', got {kernel!r}")
    return xnor_matmul_packed(pack(a), pack(b.T), a.shape[1]).float()


# ---------------------------------------------------------------------------
# The MNIST network's parameters, as mnist.py saves them.
# ---------------------------------------------------------------------------

class ParameterError(ValueError):
    """A parameter file that cannot be used; the message is one line."""


@dataclass
class BatchNorm:
    """Batch norm in inference mode, float32, as binary_net.BatchNorm evaluates it
    (Lasagne's BatchNormLayer): (x - mean) * (gamma * inv_std) + beta."""
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The float path and the threshold folding both call this, so the
        # 1-bit path decides every rounding-level tie as the float path does;
        # the order of operations is the training module's, so it also
        # predicts as the trained network in eval mode does.
        return (x - self.mean) * (self.gamma * self.inv_std) + self.beta

    def to(self, device):
        return BatchNorm(*(t.to(device) for t in (self.gamma, self.beta, self.mean, self.inv_std)))


@dataclass
class Layer:
    """A dense layer (real-valued latent weights, out x in) and its batch norm."""
    weight: torch.Tensor
    bias: torch.Tensor
    bn: BatchNorm

    def to(self, device):
        return Layer(self.weight.to(device), self.bias.to(device), self.bn.to(device))


N_LAYERS = 4
N_INPUTS = 28 * 28
BN_KEYS = {"weight": "gamma", "bias": "beta", "running_mean": "mean", "running_inv_std": "inv_std"}


def convert_running_var(arrays: dict, path) -> dict:
    """Files saved before batch norm kept Lasagne's statistics hold bnN.running_var
    (PyTorch's average of the unbiased variance) instead of bnN.running_inv_std.
    Such a model was evaluated with 1 / sqrt(running_var + epsilon), which is the
    inv_std it needs now: convert, and say so once."""
    old = sorted(k for k in arrays if k.endswith(".running_var"))
    if not old:
        return arrays
    print(f"binary_ops: note: {path} was saved with PyTorch's running_var (before batch norm kept "
          f"Lasagne's running_inv_std); converted as inv_std = 1 / sqrt(var + {BN_EPS:g})", file=sys.stderr)
    arrays = dict(arrays)
    for key in old:
        var = arrays.pop(key).astype(np.float64)
        arrays[key.replace(".running_var", ".running_inv_std")] = (1 / np.sqrt(var + BN_EPS)).astype(np.float32)
    return arrays


def load_parameters(path) -> list[Layer]:
    """Read the .npz of mnist.py: the state_dict of dense1..4 and bn1..4."""
    if not Path(path).is_file():
        raise ParameterError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ParameterError(f"{path} is not a .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ParameterError(f"cannot read {path}: {e}") from None
    arrays = {k: v for k, v in arrays.items() if not k.endswith("num_batches_tracked")}
    arrays = convert_running_var(arrays, path)
    expected = {f"dense{i}.{p}" for i in range(1, N_LAYERS + 1) for p in ("weight", "bias")}
    expected |= {f"bn{i}.{p}" for i in range(1, N_LAYERS + 1) for p in BN_KEYS}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ParameterError(f"{path} has the wrong keys (missing: {', '.join(missing) or 'none'}; "
                             f"unexpected: {', '.join(extra) or 'none'})")
    layers, n_in = [], N_INPUTS
    for i in range(1, N_LAYERS + 1):
        weight = arrays[f"dense{i}.weight"]
        if weight.ndim != 2 or weight.shape[1] != n_in:
            raise ParameterError(f"{path}: dense{i}.weight has shape {weight.shape}, expected (units, {n_in})")
        n_out = weight.shape[0]
        vectors = {}
        for key in [f"dense{i}.bias"] + [f"bn{i}.{p}" for p in BN_KEYS]:
            if arrays[key].shape != (n_out,):
                raise ParameterError(f"{path}: {key} has shape {arrays[key].shape}, expected ({n_out},)")
            vectors[key] = torch.as_tensor(arrays[key], dtype=torch.float32)
        for key, value in arrays.items():
            if key.startswith((f"dense{i}.", f"bn{i}.")) and not np.issubdtype(value.dtype, np.floating):
                raise ParameterError(f"{path}: {key} has dtype {value.dtype}, expected a float type")
        bn = BatchNorm(**{name: vectors[f"bn{i}.{p}"] for p, name in BN_KEYS.items()})
        layers.append(Layer(torch.as_tensor(weight, dtype=torch.float32), vectors[f"dense{i}.bias"], bn))
        n_in = n_out
    return layers


PIXEL_SCALE = 255       # input x = (2 p - 255) / PIXEL_SCALE, i.e. 2 p / 255 - 1


def centered_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (N x ...) as float32 rows of 2 p - 255: the network's
    input x = 2 p / 255 - 1 times PIXEL_SCALE, in exact integers."""
    return 2 * pixels.reshape(len(pixels), -1).float() - PIXEL_SCALE


# ---------------------------------------------------------------------------
# The float32 network: the reference the 1-bit network must agree with.
# ---------------------------------------------------------------------------

class FloatMLP:
    """The BinaryNet MLP in eval mode, in plain float32: binary weights
    sign(W), dense -> batch norm -> sign for the hidden layers, dense ->
    batch norm for the scores.  `matmul` swaps in another GEMM kernel.

    The first layer computes x . sign(W) as ((2 p - 255) . sign(W)) / 255:
    the same value as from x = 2 p / 255 - 1, but the product is of small
    integers and so exact in float32 whatever the summation order of the
    GEMM, and the only rounding is the division's.  Every layer is then a
    deterministic function of integer accumulators, which is what lets the
    1-bit network reproduce its predictions bit for bit."""

    def __init__(self, layers: list[Layer], matmul=torch.mm):
        self.layers = layers
        self.weights_t = [binarize(layer.weight).T.contiguous() for layer in layers]
        self.matmul = matmul

    def hidden(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's output before its sign (or the scores, for the last);
        x is centered_pixels for i = 0 and +-1 activations after."""
        layer = self.layers[i]
        product = self.matmul(x, self.weights_t[i])
        if i == 0:
            product = product / PIXEL_SCALE
        return layer.bn(product + layer.bias)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = centered_pixels(pixels)
        for i in range(len(self.layers) - 1):
            x = binarize(self.hidden(i, x))
        return self.hidden(len(self.layers) - 1, x)


# ---------------------------------------------------------------------------
# The 1-bit network.
# ---------------------------------------------------------------------------

def fold_threshold(layer: Layer, dense_output, bound: int):
    """Fold a hidden layer's bias, batch norm and sign into one integer
    threshold per unit (the "Run-time" section: only the XNOR-popcount
    accumulator d is left, compared with a constant).

    dense_output(d) maps integer accumulators to the float32 dense output
    (before the bias) that the float path sees; d ranges over [-bound, bound].
    Every float32 operation of the float path is monotone in d, so
    sign(BN(dense_output(d) + bias)) is a step function of d: it rises with d
    where gamma >= 0 and falls where gamma < 0.  Returns (direction, t),
    int64 per unit: the unit outputs +1 exactly when direction * d >= t.
    t is found by bisection on the float path's own arithmetic, so ties
    (BN output exactly 0, sign(0) = +1), gamma == 0 (a constant unit: t is
    -bound or bound + 1) and rounding are decided as the float path decides them.
    """
    direction = torch.where(layer.bn.gamma >= 0, 1, -1).to(torch.int64)

    def fires(e):  # nondecreasing in e = direction * d
        return layer.bn(dense_output(direction * e) + layer.bias) >= 0

    low = torch.full_like(direction, -bound)
    high = torch.full_like(direction, bound + 1)   # bound + 1: never fires
    while bool((searching := low < high).any()):
        mid = torch.div(low + high, 2, rounding_mode="floor")
        up = fires(mid)
        high = torch.where(searching & up, mid, high)
        low = torch.where(searching & ~up, mid + 1, low)
    return direction, low


def bit_planes(pixels: torch.Tensor) -> torch.Tensor:
    """Pack the 8 bit planes of uint8 images (M x K) as +-1 rows: row
    8 i + n holds bit n of image i's pixels, bit set where that bit is 1."""
    _check_matrix("pixels", pixels, (torch.uint8,), "uint8")
    return _pack_planes_op(pixels.contiguous())


@dataclass
class BinaryDense:
    """A dense layer of the 1-bit network: packed sign(W) rows (negated for
    units whose batch norm has gamma < 0), the layer's fan-in k, how many
    rows of the input make one input vector (8 bit planes for the first
    layer, else 1) and, for the hidden layers, each unit's threshold."""
    words: torch.Tensor
    k: int
    planes: int = 1
    threshold: torch.Tensor | None = None

    def accumulate(self, x_words: torch.Tensor) -> torch.Tensor:
        """The integer accumulators (XNOR dot products), M x N int32."""
        return _xnor_gemm_op(x_words, self.words, self.k, self.planes)

    def fire(self, x_words: torch.Tensor) -> torch.Tensor:
        """The packed activations sign(BN(.)): +1 where the accumulator reaches
        the unit's threshold, computed by the kernel without an int32 matrix."""
        return _xnor_fire_op(x_words, self.words, self.k, self.planes, self.threshold)


def binary_dense(layer: Layer, dense_output, bound: int, planes: int) -> BinaryDense:
    direction, threshold = fold_threshold(layer, dense_output, bound)
    rows = binarize(layer.weight) * direction[:, None]
    return BinaryDense(pack(rows), layer.weight.shape[1], planes, threshold.to(torch.int32))


class XnorMLP:
    """The same network on XNOR and popcount: weights packed once, hidden
    activations passed packed to packed.

    First layer: the input is 8-bit, not binary.  As in the paper it is
    computed over the pixels' bit planes: with each plane x^n read as the
    +-1 vector 2 x^n - 1 and d_n its XNOR dot product with sign(W),
        D = sum_n 2^n d_n = sum_k (2 p_k - 255) sign(W_k) = 255 * (x . sign(W))
    for the input x = 2 p / 255 - 1, so the pixel scaling is an exact
    factor 255 that the threshold absorbs (D / 255 rounded to float32 is the
    float path's first dense output)."""

    def __init__(self, layers: list[Layer]):
        first, *hidden, last = layers
        k = first.weight.shape[1]
        self.first = binary_dense(first, lambda d: d.float() / PIXEL_SCALE,
                                  (2 ** PIXEL_BITS - 1) * k, PIXEL_BITS)
        self.hidden = [binary_dense(layer, lambda d: d.float(), layer.weight.shape[1], 1)
                       for layer in hidden]
        self.last = BinaryDense(pack(binarize(last.weight)), last.weight.shape[1])
        self.last_bias, self.last_bn = last.bias, last.bn

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.first.fire(bit_planes(pixels.reshape(len(pixels), -1)))
        for layer in self.hidden:
            h = layer.fire(h)
        # The output layer's batch norm stays in float for the 10 scores.
        return self.last_bn(self.last.accumulate(h).float() + self.last_bias)

    def size_bytes(self) -> int:
        """Packed weights, one int32 threshold per hidden unit, and the output
        layer's bias and batch norm in float32."""
        packed = sum(layer.words.numel() * 8 for layer in [self.first, *self.hidden, self.last])
        thresholds = sum(layer.threshold.numel() * 4 for layer in [self.first, *self.hidden])
        return packed + thresholds + 5 * self.last_bias.numel() * 4


def float_size_bytes(layers: list[Layer]) -> int:
    return sum(4 * t.numel() for layer in layers
               for t in (layer.weight, layer.bias, layer.bn.gamma, layer.bn.beta,
                         layer.bn.mean, layer.bn.inv_std))


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


WARM_UP_MS = 300   # untimed calls at the start of each timed block


def time_ms(fns: dict, device: str, repeats, rounds: int = 1, warm_up: bool = True) -> dict:
    """Median wall time in milliseconds of each of fns (name -> function).

    Each round times each function in turn, in a block of `repeats` calls
    (an int, or a dict: name -> int).
    Rounds spread a burst of other work on a shared machine over all the
    functions, so that the ratios of the medians stay fair.  Each block
    starts with untimed calls (at least one, WARM_UP_MS in all): the worker
    threads of the previous block's runtime (OpenMP's behind torch.mm, the
    C kernels' pool) keep spinning for a while after their last job, and
    calls timed while they do were measured up to 6x slower."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            spent = 0.0
            while warm_up and spent < WARM_UP_MS:
                spent += timed(fn, device)[1]
            calls = repeats[name] if isinstance(repeats, dict) else repeats
            times[name] += [timed(fn, device)[1] for _ in range(calls)]
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn, device: str):
    """fn()'s result and its wall time in milliseconds (one run)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, 1e3 * (time.perf_counter() - start)


# ---------------------------------------------------------------------------
# --bench: the paper's kernel comparison.
# ---------------------------------------------------------------------------

CPU_SHAPES = [(100, 784, 4096), (100, 4096, 4096), (10000, 4096, 4096), (4096, 4096, 4096)]
CUDA_SHAPES = [(8192, 8192, 8192)]
BASELINE_ROWS = {"cpu": 8, "cuda": 8192}   # rows of A the baseline is timed on
BENCH_SECONDS = 3.0                          # timed seconds per kernel, about
BENCH_ROUNDS = 3                             # blocks per kernel, taken in turn


def repeats_for(fn, device: str) -> int:
    """Timed calls per block so that fn's blocks take about BENCH_SECONDS in
    all (1 to 10 calls a block)."""
    _, ms = timed(fn, device)
    return int(max(1, min(10, BENCH_SECONDS * 1e3 / BENCH_ROUNDS / max(ms, 1e-3))))


def bench_shape(device: str, m: int, k: int, n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device)
    b = torch.randn(k, n, generator=gen).to(device)
    gops = lambda ms: 2 * m * n * k / (ms * 1e6)
    rows = []

    def row(kernel, ms, **extra):
        rows.append(dict(device=device, M=m, K=k, N=n, kernel=kernel, ms=ms, gops=gops(ms), **extra))

    sub = min(m, BASELINE_ROWS[device])
    a_sub = a[:sub].contiguous()
    b_t = b.T.contiguous()
    a_words, b_words = pack(a), pack(b_t)
    # both fast kernels write into outputs made once, as a GEMM inside a
    # network would: a fresh 64 MB output costs ~10% of the XNOR product in
    # page faults, 1% of the float one
    c_float = torch.empty(m, n, device=device)
    c_int = torch.empty(m, n, dtype=torch.int32, device=device)
    kernels = {"baseline": lambda: baseline_matmul(a_sub, b),
               "blas": lambda: torch.mm(a, b, out=c_float),
               "xnor": lambda: xnor_matmul_packed(a_words, b_words, k, out=c_int)}
    if device == "cuda" and cuda_kernels.has_tensor_core_xnor(a.device):
        # the ordinary-core kernel too, which "xnor" replaces on such GPUs
        kernels["xnor_popc"] = lambda: cuda_kernels.xnor_gemm(a_words, b_words, k, out=c_int,
                                                              name="xnor_gemm")
    repeats = {name: repeats_for(fn, device) for name, fn in kernels.items()}
    ms = time_ms(kernels, device, repeats, rounds=BENCH_ROUNDS)
    pack_both = lambda: (pack(a), pack(b_t))
    pack_ms = time_ms({"pack": pack_both}, device, repeats_for(pack_both, device))["pack"]
    row("baseline", ms["baseline"] * m / sub, rows_timed=sub)
    row("blas", ms["blas"])
    row("xnor", ms["xnor"], pack_ms=pack_ms)
    if "xnor_popc" in ms:
        row("xnor_popc", ms["xnor_popc"])
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_bench_table(rows: list[dict]) -> None:
    print(f"{'device':6} {'M':>6} {'K':>5} {'N':>5}  {'kernel':8} {'ms':>10} {'GOPS':>8} "
          f"{'vs blas':>8}  note")
    blas = {(r["device"], r["M"], r["K"], r["N"]): r["ms"] for r in rows if r["kernel"] == "blas"}
    for r in rows:
        speedup = blas[(r["device"], r["M"], r["K"], r["N"])] / r["ms"]
        note = ""
        if "rows_timed" in r and r["rows_timed"] < r["M"]:
            note = f"timed on {r['rows_timed']} of {r['M']} rows, scaled"
        if "pack_ms" in r:
            note = f"packing both operands: {r['pack_ms']:.2f} ms (not included)"
        print(f"{r['device']:6} {r['M']:>6} {r['K']:>5} {r['N']:>5}  {r['kernel']:8} "
              f"{r['ms']:>10.2f} {r['gops']:>8.1f} {speedup:>7.1f}x  {note}")


def devices_to_run(device) -> list[str]:
    """The CPU and, where present, CUDA; or only `device`."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("--device cuda: no CUDA GPU is visible to PyTorch")
    return [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_bench(json_path, devices) -> int:
    lib = cpu_kernels.library()
    popcount = lib.bnn_popcount_kind().decode() if lib else "none (pure-PyTorch path)"
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; popcount: {popcount}; "
          f"load average {os.getloadavg()[0]:.2f} (others' work skews the timings)")
    if lib is None and "cpu" in devices:
        print("binary_ops: error: the CPU benchmark needs the C kernels (no C compiler found)",
              file=sys.stderr)
        return 2
    jobs = [("cpu", shape) for shape in CPU_SHAPES if "cpu" in devices]
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name()}")
        jobs += [("cuda", shape) for shape in CUDA_SHAPES]
    print("ms: median wall time; GOPS: 2 M N K / time (one XNOR-popcount bit counts as "
          "a multiply and an add)")
    rows = []
    for device, (m, k, n) in jobs:
        rows += bench_shape(device, m, k, n)
    print_bench_table(rows)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return 0


# ---------------------------------------------------------------------------
# --infer: the paper's 1-bit MNIST inference.
# ---------------------------------------------------------------------------

def error_rate(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Test error in percent, as mnist.py reports it."""
    return 100.0 * (scores.argmax(1).cpu() != labels).float().mean().item()


WARM_UP = 100       # images run once before timing
INFER_REPEATS = 3   # timed passes over the test set, median taken


def infer(layers: list[Layer], pixels: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
    """Run both networks on the test set on one device; compare and time them."""
    layers = [layer.to(device) for layer in layers]
    pixels = pixels.to(device)
    float_net, xnor_net = FloatMLP(layers), XnorMLP(layers)
    float_net(pixels[:WARM_UP])   # thread pools, kernel compilation
    xnor_net(pixels[:WARM_UP])
    # each network's first full pass gives its scores and warms it up (see time_ms)
    float_scores = float_net(pixels)
    float_ms = time_ms({"float": lambda: float_net(pixels)}, device, INFER_REPEATS, warm_up=False)["float"]
    xnor_scores = xnor_net(pixels)
    xnor_ms = time_ms({"xnor": lambda: xnor_net(pixels)}, device, INFER_REPEATS, warm_up=False)["xnor"]
    result = dict(float_err=error_rate(float_scores, labels), xnor_err=error_rate(xnor_scores, labels),
                  identical=bool(torch.equal(float_scores.argmax(1), xnor_scores.argmax(1))),
                  float_ms=float_ms, xnor_ms=xnor_ms,
                  bytes_32bit=float_size_bytes(layers), bytes_1bit=xnor_net.size_bytes())
    if device == "cuda":
        baseline_net = FloatMLP(layers, matmul=baseline_matmul)
        baseline_net(pixels[:WARM_UP])
        result["baseline_ms"] = time_ms({"baseline": lambda: baseline_net(pixels)},
                                        device, INFER_REPEATS, warm_up=False)["baseline"]
    return result


def print_infer(result: dict, device: str, n_images: int, hidden: int) -> None:
    print(f"MNIST test set: {n_images} images, {hidden} hidden units, {device}"
          + (f", {torch.get_num_threads()} threads" if device == "cpu" else ""))
    print(f"  float32 forward: test error {result['float_err']:.2f}%, {result['float_ms']:.1f} ms")
    print(f"  1-bit XNOR:      test error {result['xnor_err']:.2f}%, {result['xnor_ms']:.1f} ms "
          f"({result['float_ms'] / result['xnor_ms']:.1f}x faster)")
    if "baseline_ms" in result:
        print(f"  baseline kernel: {result['baseline_ms']:.1f} ms "
              f"(XNOR {result['baseline_ms'] / result['xnor_ms']:.1f}x faster)")
    print(f"  predictions identical: {'yes' if result['identical'] else 'NO'}")
    print(f"  model size: {result['bytes_32bit'] / 2**20:.2f} MiB at 32 bits, "
          f"{result['bytes_1bit'] / 2**20:.2f} MiB at 1 bit "
          f"({result['bytes_32bit'] / result['bytes_1bit']:.1f}x smaller)")


def load_test_set(data_dir):
    """The MNIST test set through datasets.load_mnist, as torch tensors;
    without a data folder, datasets' own cache (downloading if needed)."""
    import datasets
    try:
        X, y = datasets.load_mnist(data_dir, download=data_dir is None)["test"]
    except datasets.DataError as e:
        raise ParameterError(str(e)) from None
    return torch.as_tensor(X).reshape(len(X), -1), torch.as_tensor(y)


def run_infer(npz_path, data_dir, json_path, devices) -> int:
    layers = load_parameters(npz_path)
    pixels, labels = load_test_set(data_dir)
    results = {}
    for device in devices:
        results[device] = infer(layers, pixels, labels, device)
        print_infer(results[device], device, len(pixels), layers[0].weight.shape[0])
    if json_path:
        out = dict(results[devices[0]])
        if len(devices) > 1:
            out["cuda"] = results["cuda"]
        Path(json_path).write_text(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time baseline, BLAS and XNOR GEMMs")
    parser.add_argument("--infer", metavar="NPZ", help="1-bit MNIST inference on these parameters")
    parser.add_argument("--data-dir", help="folder of the MNIST files (for --infer)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="only this device (default: the CPU, and CUDA where present)")
    args = parser.parse_args(argv)
    if args.bench == bool(args.infer):
        parser.error("give exactly one of --bench and --infer")
    try:
        devices = devices_to_run(args.device)
        if args.bench:
            return run_bench(args.json, devices)
        return run_infer(args.infer, args.data_dir, args.json, devices)
    except (ParameterError, OSError) as e:
        print(f"binary_ops: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
