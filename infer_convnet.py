"""1-bit inference of BinaryNet's ConvNets (the CIFAR-10 and SVHN networks of
Courbariaux et al. 2016) on the XNOR-popcount kernels; it reproduces the float
network of convnet.py prediction for prediction (and score for score).

The binary convolution is Larq Compute Engine's design, on this project's kernels:
- activations bit-packed NHWC: a pixel is ceil(C / 64) int64 words, channel c at
  bit c % 64 of word c // 64 (pack's layout), the bits past C 0;
- im2col on bits: each output pixel's 3x3 window of pixel words, gathered by a
  1-D index table of words, is one row of the XNOR GEMM against the packed weights;
- zero padding exact by a correction: a pixel outside the image is gathered as
  an all-0 word (every channel -1), which adds -sum_c w[o, c, tap] where the
  trained network adds 0, so a border pixel's threshold is moved by the sums of
  its padding taps.  The pixels fall in a few classes of window (inside the
  image, and one per pattern of padding taps: the 4 edges and 4 corners), and
  each class has its row of thresholds.  Channel bits past C are 0 in both
  operands: they agree, a constant the thresholds absorb too;
- bias, max-pool, batch norm and sign: integer thresholds (infer.fold_threshold,
  on the float network's own arithmetic), then an OR of the pool window's bits
  where the batch norm rises (gamma >= 0) and an AND where it falls;
- the first layer on the 8 bit planes of the uint8 pixels, padded with 0 pixels;
- the dense layers as the MNIST network's, the output batch norm in float.
A layer is one call of the fused GEMM-and-threshold kernel: a row a pixel,
image by image in row-major order (the layout of its output and so of the next
layer's input), each row tested against its class's thresholds.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from binary_ops import PIXEL_BITS, bit_planes, pack, pack_weights, sign, words, xnor_fire_op
from convnet import BATCH, ConvLayer, ConvNet, FloatConvNet
from infer import PIXEL_SCALE, BinaryDense, Layer, binary_dense, compare, fold_threshold

KERNEL_THREADS = [torch.get_num_threads()]   # while torch's own ops run on one (on_all_threads)


def on_all_threads(kernel, *args):
    """Call a C kernel on all threads, inside a forward pass whose own torch
    ops (gathers, compares, pools) run on one (one_thread_between_kernels)."""
    torch.set_num_threads(KERNEL_THREADS[0])
    try:
        return kernel(*args)
    finally:
        torch.set_num_threads(1)


@contextmanager
def one_thread_between_kernels():
    """Why: the kernels' pool threads spin for 2 ms after each call, and on two
    cores an OpenMP team of two started meanwhile waits for its second thread:
    the small torch ops between the kernels took 10-30x their one-thread time
    (docs/results.md).  On one thread they run beside the spinning pool."""
    KERNEL_THREADS[0] = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(KERNEL_THREADS[0])


# ---------------------------------------------------------------------------
# The 1-bit network.
# ---------------------------------------------------------------------------

def window_taps(h: int, w: int) -> torch.Tensor:
    """(h w) x 9 int64: for each pixel (row-major), the pixel under each tap
    of its 3x3 window (row-major), -1 where the tap falls in the padding."""
    offsets = torch.tensor([-1, 0, 1])
    y = torch.arange(h)[:, None, None, None] + offsets[None, None, :, None]
    x = torch.arange(w)[None, :, None, None] + offsets[None, None, None, :]
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    return torch.where(inside, y * w + x, -1).reshape(h * w, 9)


def pool_windows(h: int, w: int) -> torch.Tensor:
    """(h//2 w//2) x 4: the pixels of each 2x2 max-pool window (floor mode)."""
    y = 2 * torch.arange(h // 2)[:, None, None, None] + torch.arange(2)[None, None, :, None]
    x = 2 * torch.arange(w // 2)[None, :, None, None] + torch.arange(2)[None, None, None, :]
    return (y * w + x).reshape(-1, 4)


def pack_channels(x: torch.Tensor) -> torch.Tensor:
    """Pack +-1 values (..., C) into (..., words(C)) int64 words."""
    return pack(x.contiguous())


@dataclass
class LayerPlan:
    """A binary conv layer's work for a batch of images of one size: the index
    table of its GEMM (the input words under each tap, a row a pixel, image
    by image), each row's class of window (uint8), each class's thresholds
    (classes x units, int32) and the pool windows' words."""
    table: torch.Tensor
    row_class: torch.Tensor
    thresholds: torch.Tensor
    pool_table: torch.Tensor | None


def word_table(rows: torch.Tensor, n_words: int) -> torch.Tensor:
    """The flat index of each word of the given rows (of n_words words each):
    gathers as one 1-D index_select, many times faster than a 2-D one."""
    return (rows.reshape(-1, 1) * n_words + torch.arange(n_words, device=rows.device)).reshape(-1)


class BinaryConv:
    """One conv layer of the 1-bit network (module doc).  Weight rows are
    sign(W) times the unit's direction, tap by tap, each tap's channels packed
    into words(C) words: the GEMM's K is 9 words(C) 64 bits, of which
    9 (64 words(C) - C) are padding bits that agree.  The first layer's rows
    are 36 signs in one word, 9 taps of 4 channels: the 3 colours and a 4th of
    0 pixels against a weight of -1 (a constant 9 * 255), so that a pixel is
    one int32 to gather; its input is the pixels' 8 bit planes."""

    def __init__(self, layer: ConvLayer, first: bool):
        n_out, c_in = layer.weight.shape[:2]
        self.first = first
        scale, dense_output = ((PIXEL_SCALE, lambda d: d.float() / PIXEL_SCALE) if first
                               else (1, lambda d: d.float()))
        direction, self.threshold = fold_threshold(layer, dense_output, scale * 9 * c_in)
        taps = (sign(layer.weight) * direction[:, None, None, None]).permute(0, 2, 3, 1)
        # what a tap in the padding adds to the GEMM (all 0 bits: -w, or 0 pixels: -255 w)
        # where the network adds 0: the correction, unit by unit
        self.tap_sums = scale * taps.sum(-1).reshape(n_out, 9).to(torch.int64)
        if first:
            taps = torch.cat([taps, -torch.ones_like(taps[..., :1])], -1)
            self.words, self.k = pack(taps.reshape(n_out, -1)), 36
            self.offset, self.in_words = 9 * PIXEL_SCALE, 1
        else:
            self.words = pack_channels(taps).reshape(n_out, -1)
            self.k, self.in_words = self.words.shape[1] * 64, words(c_in)
            self.offset = self.k - 9 * c_in
        self.weights = pack_weights(self.words, self.k)    # laid out once, at the first product
        self.words = self.weights.words
        self.out_words, self.pool = words(n_out), layer.pool
        # pooled bit: OR of the window where the unit's direction is +1, AND where -1
        rising = torch.zeros(self.out_words * 64, dtype=torch.bool, device=direction.device)
        rising[:n_out] = direction > 0
        self.or_mask = pack(torch.where(rising, 1.0, -1.0)[None])[0]

    def plan(self, batch: int, h: int, w: int, device) -> LayerPlan:
        """The tables for a batch whose input is a row a pixel, image by
        image, with an all-0 row last (the padding)."""
        taps = window_taps(h, w).to(device)
        outside = taps < 0
        # the classes of window: a class per pattern of padding taps (all
        # inside sorts first: class 0 wherever the image has an interior)
        patterns, window_class = torch.unique(outside, dim=0, return_inverse=True)
        images = torch.arange(batch, device=device)[:, None, None] * (h * w)
        table = torch.where(outside, batch * h * w, images + taps)     # batch x pixels x 9
        # each class's correction (classes x units): its padding taps' sums
        correction = (patterns[:, None, :] * self.tap_sums).sum(-1)
        thresholds = (self.threshold - correction + self.offset).to(torch.int32)
        pool_table = None
        if self.pool:
            pool_table = word_table(images + pool_windows(h, w).to(device), self.out_words)
        return LayerPlan(word_table(table, self.in_words), window_class.to(torch.uint8).repeat(batch),
                         thresholds, pool_table)

    def __call__(self, source: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        """Packed activations, a row a pixel and an all-0 row last, from the
        input's (int32 pixels for the first layer) in the same layout."""
        rows = source.view(-1).index_select(0, plan.table).view(-1, 9 * self.in_words)
        planes = PIXEL_BITS if self.first else 1
        if self.first:
            rows = on_all_threads(bit_planes, rows.view(torch.uint8))
        layout = on_all_threads(self.weights.layout_for, rows, planes)
        fired = on_all_threads(xnor_fire_op, rows, self.words, self.k, planes,
                               plan.thresholds, plan.row_class, layout)
        if self.pool:
            fired = self.max_pool(fired.view(-1).index_select(0, plan.pool_table).view(-1, 4, self.out_words))
        return torch.cat([fired, fired.new_zeros(1, self.out_words)])

    def max_pool(self, window: torch.Tensor) -> torch.Tensor:
        """sign(BN(max(.))) of the 4 pixels: BN is monotone, so for a rising
        unit it is the OR of the pixels' bits, for a falling one the AND."""
        any_ = window[:, 0] | window[:, 1] | window[:, 2] | window[:, 3]
        all_ = window[:, 0] & window[:, 1] & window[:, 2] & window[:, 3]
        return (any_ & self.or_mask) | (all_ & ~self.or_mask)


def flatten_dense(layer: Layer, c: int, pixels: int) -> BinaryDense:
    """The first dense layer on the last conv's packed NHWC output: its
    weight columns (PyTorch flattens NCHW: c * pixels + p) reordered to
    (pixel, channel), each pixel's channels packed into words(c) words."""
    direction, threshold = fold_threshold(layer, lambda d: d.float(), c * pixels)
    w = sign(layer.weight) * direction[:, None]
    w = pack_channels(w.view(-1, c, pixels).transpose(1, 2)).reshape(len(w), -1)
    k = w.shape[1] * 64
    return BinaryDense(w, k, 1, (threshold + k - c * pixels).to(torch.int32))


def pixel_rows(pixels: torch.Tensor) -> torch.Tensor:
    """The first layer's input: uint8 images N x 3 x H x W as one int32 a
    pixel (the bytes R, G, B, 0), row-major, and a 0 pixel last (the padding)."""
    n, c, h, w = pixels.shape
    rows = pixels.new_zeros(n * h * w + 1, 4)
    rows[:-1, :c] = pixels.permute(0, 2, 3, 1).reshape(-1, c)
    return rows.view(torch.int32)


class XnorConvNet:
    """The ConvNet on XNOR and popcount, activations packed from layer to
    layer (module doc); index tables made once per batch and image size."""

    def __init__(self, net: ConvNet):
        self.convs = [BinaryConv(layer, i == 0) for i, layer in enumerate(net.convs)]
        first, *hidden, last = net.dense
        c_last = net.convs[-1].weight.shape[0]
        self.first_dense = flatten_dense(first, c_last, first.weight.shape[1] // c_last)
        self.hidden = [binary_dense(layer, lambda d: d.float(), layer.weight.shape[1], 1)
                       for layer in hidden]
        self.last = BinaryDense(pack(sign(last.weight)), last.weight.shape[1])
        self.last_bias, self.last_bn = last.bias, last.bn
        self.plans = {}

    def plan(self, batch: int, h: int, w: int, device) -> list:
        key = (batch, h, w, str(device))
        if key not in self.plans:
            plans = []
            for conv in self.convs:
                plans.append(conv.plan(batch, h, w, device))
                h, w = (h // 2, w // 2) if conv.pool else (h, w)
            self.plans[key] = plans
        return self.plans[key]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with one_thread_between_kernels():
            return torch.cat([self.scores(batch) for batch in pixels.split(BATCH)])

    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, c, h, w = pixels.shape
        plans = self.plan(batch, h, w, pixels.device)
        x = pixel_rows(pixels)
        for conv, plan in zip(self.convs, plans):
            x = conv(x, plan)
        h = on_all_threads(self.first_dense.fire, x[:-1].reshape(batch, -1))   # the padding row off
        for layer in self.hidden:
            h = on_all_threads(layer.fire, h)
        return self.last_bn(on_all_threads(self.last.accumulate, h).float() + self.last_bias)

    def size_bytes(self) -> int:
        """What a 1-bit model file needs: packed weights, one int32 threshold
        per hidden unit, the output layer's bias and batch norm in float32.
        (The border pixels' thresholds are derived from these and the weights.)"""
        dense = [self.first_dense]
        packed = sum(layer.words.numel() * 8 for layer in self.convs + dense + self.hidden + [self.last])
        thresholds = sum(layer.threshold.numel() * 4 for layer in self.convs + dense + self.hidden)
        return packed + thresholds + 5 * self.last_bias.numel() * 4


def infer(net: ConvNet, pixels: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
    """Run both ConvNets on the test set on one device; compare and time them."""
    net, pixels = net.to(device), pixels.to(device)
    xnor_net = XnorConvNet(net)
    result = compare(FloatConvNet(net), xnor_net, pixels, labels, device, interleave=True)
    return result | dict(bytes_32bit=net.float_bytes(), bytes_1bit=xnor_net.size_bytes())
