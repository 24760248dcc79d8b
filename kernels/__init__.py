"""Hand-written kernels of BinaryNet's 1-bit run time and their loaders:
xnor_cpu.c (pack, XNOR GEMM, baseline GEMM; cpu.py builds and calls it) and
xnor_gemm_tc.cu, xnor_gemm.cu, pack.cu, baseline_gemm.cu (cuda.py compiles them
with NVRTC)."""

WORD_BITS = 64


def words(k: int) -> int:
    """Number of 64-bit words that hold k packed signs (the layout: binary_ops' doc)."""
    return (k + WORD_BITS - 1) // WORD_BITS
