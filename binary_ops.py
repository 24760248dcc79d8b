"""BinaryNet's 1-bit run time (Courbariaux et al. 2016, arXiv 1602.02830,
section "Run-time" and the MNIST inference it reports).

The ops.  A trained BNN multiplies matrices of +-1.  Packing 64 signs into a word turns a
dot product of K values into K - 2 * popcount(a XOR b): bits that agree count
+1, bits that differ -1.  This module is the PyTorch face of the hand-written
kernels in kernels/ (C on the CPU, CUDA on the GPU), exposed as torch.library
custom ops: `pack`, `xnor_matmul`, `xnor_matmul_packed`, `baseline_matmul`, and
`pack_weights` (weights prepared once for many products: see PackedWeights).
The 1-bit MNIST network is infer.py; the kernel benchmark is bench.py.

Packed layout (one convention everywhere): `pack` packs the last dimension;
element k lives in bit k % 64 (bit 0 least significant) of int64 word k // 64;
the bit is 1 for x >= 0 (sign(0) = +1) and 0 for x < 0; the unused high bits of
the last word are 0.  A GEMM a @ b packs the rows of a and the columns of b,
i.e. pack(a) and pack(b.T): both operands are packed along K.

Command line (bench.py and infer.py do the work):
    python binary_ops.py --bench [--json PATH] [--device cpu|cuda]
    python binary_ops.py --infer P.npz --data-dir DIR [--limit N] [--dataset mnist|cifar10|svhn]
                         [--json PATH] [--device cpu|cuda]
"""
import argparse
import sys

import torch

from binary_net import sign  # sign(0) = +1, as in training; binary_net also turns on huge pages (see there)
from kernels import WORD_BITS, check_row_class, words  # the word count, written once for the kernels' wrappers too
from kernels import cpu as cpu_kernels
from kernels import cuda as cuda_kernels

PIXEL_BITS = 8          # MNIST pixels are 8-bit fixed point


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


def row_thresholds(threshold: torch.Tensor, row_class, n: int) -> torch.Tensor:
    """Each row's thresholds (rows x N, or N for all): row row_class[i] of the
    table (classes x N), its row 0 without row_class."""
    table = threshold.view(-1, n)
    return table[0] if row_class is None else table[row_class.long()]


def fire_torch(d: torch.Tensor, threshold: torch.Tensor, row_class=None) -> torch.Tensor:
    """Packed activations: +1 where the accumulator d reaches the threshold
    (of its row's class, row_thresholds)."""
    return pack_torch(torch.where(d >= row_thresholds(threshold, row_class, d.shape[1]), 1.0, -1.0))


# ---------------------------------------------------------------------------
# Custom ops: the dispatch point between the C kernels, the CUDA kernels and
# the PyTorch fallback.  They take contiguous tensors; the public functions
# below check and reshape the user's input.  `planes` > 1 combines groups of
# rows of `a` as bit planes (the first layer); `threshold` turns the dot
# products into the next layer's packed input (the hidden layers): N int32,
# or a table of classes x N with `row_class` (M uint8) naming each output
# row's row of it (a conv layer's interior and border pixels).
#
# They are defined with torch.library's low-level API (define, impl,
# register_fake) rather than torch.library.custom_op, whose Python wrappers
# (autograd, default filling, aliasing checks) cost 60-90 us a call against
# ~6 us here: a tenth of a 100-row XNOR product.  None of them has a
# gradient; their outputs are integer tensors.  infer.py calls xnor_gemm_op
# and xnor_fire_op directly, on operands it has packed and checked itself.
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


pack_op = _op("pack(Tensor x) -> Tensor", _pack_cpu, cuda_kernels.pack,
               lambda x: x.new_empty(x.shape[0], words(x.shape[1]), dtype=torch.int64))


def _pack_planes_cpu(pixels):
    lib = cpu_kernels.library()
    return pack_planes_torch(pixels) if lib is None else cpu_kernels.pack_planes(lib, pixels)


pack_planes_op = _op(
    "pack_planes(Tensor pixels) -> Tensor", _pack_planes_cpu, cuda_kernels.pack_planes,
    lambda pixels: pixels.new_empty(PIXEL_BITS * pixels.shape[0], words(pixels.shape[1]),
                                    dtype=torch.int64))


# `layout` (optional, CPU only): b laid out once for the kernel that runs
# (PackedWeights.layout_for), so a vertical kernel need not transpose b on
# every call; made from this same b, or the call is refused.
def _xnor_gemm_cpu(a, b, k, planes, layout=None):
    lib = cpu_kernels.library()
    if lib is None:
        return combine_planes(xnor_gemm_torch(a, b, k), planes)
    return cpu_kernels.xnor_gemm(lib, a, b, k, planes, layout=layout)


xnor_gemm_op = _op(
    "xnor_gemm(Tensor a, Tensor b, int k, int planes, Tensor? layout=None) -> Tensor", _xnor_gemm_cpu,
    lambda a, b, k, planes, layout=None: combine_planes(cuda_kernels.xnor_gemm(a, b, k), planes),
    lambda a, b, k, planes, layout=None: a.new_empty(a.shape[0] // planes, b.shape[0],
                                                     dtype=torch.int32))


def _xnor_gemm_out_cpu(a, b, k, out, layout=None):
    lib = cpu_kernels.library()
    if lib is None:
        out.copy_(xnor_gemm_torch(a, b, k))
    else:
        cpu_kernels.xnor_gemm(lib, a, b, k, 1, out=out, layout=layout)


def _xnor_gemm_out_cuda(a, b, k, out, layout=None):
    cuda_kernels.xnor_gemm(a, b, k, out=out)


xnor_gemm_out_op = _op(
    "xnor_gemm_out(Tensor a, Tensor b, int k, Tensor(a!) out, Tensor? layout=None) -> ()",
    _xnor_gemm_out_cpu, _xnor_gemm_out_cuda, lambda a, b, k, out, layout=None: None)


def _xnor_fire_cpu(a, b, k, planes, threshold, row_class=None, layout=None):
    lib = cpu_kernels.library()
    if lib is None:
        check_row_class(threshold, row_class, a.shape[0] // planes, b.shape[0])
        return fire_torch(xnor_gemm_op(a, b, k, planes), threshold, row_class)
    return cpu_kernels.xnor_gemm(lib, a, b, k, planes, threshold, row_class=row_class, layout=layout)


def _xnor_fire_cuda(a, b, k, planes, threshold, row_class=None, layout=None):
    """pack.cu's fire takes one threshold per unit: with row classes, the
    compare runs in PyTorch and pack.cu packs its signs."""
    d = xnor_gemm_op(a, b, k, planes)
    check_row_class(threshold, row_class, d.shape[0], d.shape[1])
    if row_class is None:
        return cuda_kernels.fire(d, threshold.view(-1, d.shape[1])[0].contiguous())
    return cuda_kernels.pack(torch.where(d >= row_thresholds(threshold, row_class, d.shape[1]),
                                         1.0, -1.0))


xnor_fire_op = _op(
    "xnor_fire(Tensor a, Tensor b, int k, int planes, Tensor threshold, Tensor? row_class=None, "
    "Tensor? layout=None) -> Tensor",
    _xnor_fire_cpu, _xnor_fire_cuda,
    lambda a, b, k, planes, threshold, row_class=None, layout=None: a.new_empty(
        a.shape[0] // planes, words(b.shape[0]), dtype=torch.int64))


def _baseline_gemm_cpu(a, b):
    lib = cpu_kernels.library()
    if lib is None:
        raise RuntimeError("the baseline kernel is C code and no C compiler was found")
    return cpu_kernels.baseline_gemm(lib, a, b)


baseline_gemm_op = _op("baseline_gemm(Tensor a, Tensor b) -> Tensor", _baseline_gemm_cpu,
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
    return pack_op(flat).view(*x.shape[:-1], words(k))


class PackedWeights:
    """Packed weights (N x KW words, K bits a row) and, made lazily and kept,
    their layout for each vertical kernel the choice picks for them (B
    transposed into bit-sliced blocks: cpu_kernels.make_layout), so that a
    product with them transposes nothing: weights used many times, as at
    inference, are laid out once.  Holds its own copy of the words, which
    it never changes, so a layout always belongs to the words beside it."""

    def __init__(self, words_: torch.Tensor, k: int):
        self.words, self.k = words_.contiguous().clone(), k
        self._layouts = {}      # kernel index -> layout (None: the kernel takes none)
        self._kernels = {}      # (rows, planes, BINARYNET_KERNEL) -> kernel index

    def layout_for(self, a_words: torch.Tensor, planes: int = 1) -> torch.Tensor | None:
        """The layout for the kernel that the product with a_words (rows of
        A, planes rows an output row) runs, or None (no C library, not on
        the CPU, a kernel that transposes nothing, a product with no rows)."""
        lib = cpu_kernels.library()
        m = a_words.shape[0] // planes
        if lib is None or self.words.device.type != "cpu" or m == 0 or self.words.shape[0] == 0:
            return None
        key = (m, planes, cpu_kernels.forced_kernel())
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = cpu_kernels.chosen_kernel(
                lib, a_words, self.words, m, self.words.shape[0], self.k, planes)
        if kernel not in self._layouts:
            self._layouts[kernel] = cpu_kernels.make_layout(lib, self.words, self.k, kernel)
        return self._layouts[kernel]


def pack_weights(b_words: torch.Tensor, k: int) -> PackedWeights:
    """Packed weights (b_words = pack(W) for the N x K weights W, N x KW
    words) prepared for many products: xnor_matmul_packed takes the result
    in place of b_words and lays the weights out once for its kernel, as
    bnn-lab's prepacked call does."""
    _check_matrix("b_words", b_words, (torch.int64,), "packed int64")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if b_words.shape[1] != words(k):
        raise ValueError(f"b_words has {b_words.shape[1]} words per row, but K={k} packs into {words(k)}")
    return PackedWeights(b_words, k)


def xnor_matmul_packed(a_words: torch.Tensor, b_words, k: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The XNOR-popcount GEMM on packed operands: the M x N int32 matrix of
    dot products sign(a) @ sign(b), given a_words = pack(a) (M x KW) and
    b_words = pack(b.T) (N x KW), or pack_weights(pack(b.T), k) (the same
    weights laid out once for the kernel).  Pack once, multiply many
    times; with `out` (a contiguous M x N int32 tensor), the result is
    written there, and repeated products pay no allocation."""
    layout = None
    if isinstance(b_words, PackedWeights):
        if b_words.k != k:
            raise ValueError(f"the packed weights have K={b_words.k}, not K={k}")
        _check_matrix("a_words", a_words, (torch.int64,), "packed int64")
        layout, b_words = b_words.layout_for(a_words.contiguous()), b_words.words
    _check_matrix("a_words", a_words, (torch.int64,), "packed int64")
    _check_matrix("b_words", b_words, (torch.int64,), "packed int64")
    _check_same_device(a_words, b_words)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, w in (("a_words", a_words), ("b_words", b_words)):
        if w.shape[1] != words(k):
            raise ValueError(f"{name} has {w.shape[1]} words per row, but K={k} packs into {words(k)}")
    if out is None:
        return xnor_gemm_op(a_words.contiguous(), b_words.contiguous(), k, 1, layout)
    _check_tensor("out", out, (torch.int32,), "32-bit integer")
    _check_same_device(a_words, out)
    shape = (a_words.shape[0], b_words.shape[0])
    if tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int32 tensor of shape {shape}, "
                         f"got shape {tuple(out.shape)}" + ("" if out.is_contiguous() else ", not contiguous"))
    xnor_gemm_out_op(a_words.contiguous(), b_words.contiguous(), k, out, layout)
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
    return baseline_gemm_op(a.float().contiguous(), b.float().contiguous())


def xnor_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str = "xnor") -> torch.Tensor:
    """sign(a) @ sign(b) as a float32 M x N matrix for float a (M x K) and
    b (K x N); exact while K <= 2^24, where float32 holds every integer.
    kernel="xnor" packs both and runs the XNOR GEMM; kernel="baseline"
    multiplies the signs with the baseline float kernel."""
    _check_operands(a, b)
    if kernel == "baseline":
        return baseline_matmul(sign(a.float()), sign(b.float()))
    if kernel != "xnor":
        raise ValueError(f"kernel must be 'xnor' or 'baseline', got {kernel!r}")
    return xnor_matmul_packed(pack(a), pack(b.T), a.shape[1]).float()


def bit_planes(pixels: torch.Tensor) -> torch.Tensor:
    """Pack the 8 bit planes of uint8 images (M x K) as +-1 rows: row
    8 i + n holds bit n of image i's pixels, bit set where that bit is 1."""
    _check_matrix("pixels", pixels, (torch.uint8,), "uint8")
    return pack_planes_op(pixels.contiguous())


# ---------------------------------------------------------------------------
# Command line: --bench is bench.py, --infer is infer.py.
# ---------------------------------------------------------------------------

class UsageError(ValueError):
    """A mistake in the command or in a file it names; printed as one line."""


def devices_to_run(device) -> list[str]:
    """The CPU and, where present, CUDA; or only `device`."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch")
    return [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time baseline, BLAS and XNOR GEMMs")
    parser.add_argument("--infer", metavar="NPZ", help="1-bit inference on the parameters that mnist.py, "
                        "cifar10.py or svhn.py saved (the network is recognised from the file)")
    parser.add_argument("--data-dir", help="folder of the test set's files (for --infer)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N test images (for --infer)")
    parser.add_argument("--dataset", choices=["mnist", "cifar10", "svhn"],
                        help="the test set to run (for --infer; default: the one the network was built for)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="only this device (default: the CPU, and CUDA where present)")
    args = parser.parse_args(argv)
    if args.bench == bool(args.infer):
        parser.error("give exactly one of --bench and --infer")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        devices = devices_to_run(args.device)
        if args.bench:
            import bench
            return bench.run_bench(args.json, devices)
        import infer
        return infer.run_infer(args.infer, args.data_dir, args.json, devices, args.limit, args.dataset)
    except (UsageError, OSError) as e:
        print(f"binary_ops: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # bench.py and infer.py import binary_ops: let them find this module, run as a
    # script, rather than load a second copy (its ops can be registered only once).
    sys.modules["binary_ops"] = sys.modules[__name__]
    import warnings  # a warning to the user in one line, as the training scripts print it
    warnings.formatwarning = lambda message, *_, **__: f"binary_ops: warning: {message}\n"
    sys.exit(main())
