"""What the 1-bit tests share: the plain float64 reference every kernel is
compared with bit for bit (sign(a) @ sign(b), sign(0) = +1), random operands,
the inverse of pack, and which tools this machine has."""
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_C = shutil.which("gcc") is not None
HAS_CUDA = torch.cuda.is_available()
needs_c = pytest.mark.skipif(not HAS_C, reason="no C compiler")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no GPU")

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
