"""Hand-written kernels of BinaryNet's 1-bit run time and their loaders:
xnor_cpu.c (pack, XNOR GEMM, baseline GEMM; cpu.py builds and calls it) and
xnor_gemm_tc.cu, xnor_gemm.cu, pack.cu, baseline_gemm.cu (cuda.py compiles them
with NVRTC)."""
import torch

WORD_BITS = 64


def words(k: int) -> int:
    """Number of 64-bit words that hold k packed signs (the layout: binary_ops' doc)."""
    return (k + WORD_BITS - 1) // WORD_BITS


def check_row_class(threshold, row_class, m: int, n: int) -> None:
    """ValueError (one line) unless threshold is a table of N int32 per class
    and row_class, where given, names one of its classes for each of M rows
    (uint8): the C kernels read them unchecked."""
    if threshold.dtype != torch.int32 or threshold.numel() < n or threshold.numel() % max(n, 1):
        raise ValueError(f"threshold must be int32 with {n} entries a class, "
                         f"got {threshold.dtype} of shape {tuple(threshold.shape)}")
    if row_class is None:
        return
    if row_class.dtype != torch.uint8 or row_class.shape != (m,):
        raise ValueError(f"row_class must be {m} uint8 class indices, "
                         f"got {row_class.dtype} of shape {tuple(row_class.shape)}")
    classes = threshold.numel() // max(n, 1)
    if m and n and (most := most_class(row_class)) >= classes:
        raise ValueError(f"row_class names class {most}, "
                         f"but the threshold table has {classes} (0 to {classes - 1})")


def most_class(row_class) -> int:
    """The largest class index.  On the CPU by numpy, on one thread: torch's
    max would start a two-thread team while the kernels' pool thread spins,
    and wait for its second thread (a 1-bit SVHN pass took 1.5x)."""
    return int(row_class.numpy().max() if row_class.device.type == "cpu" else row_class.max())
