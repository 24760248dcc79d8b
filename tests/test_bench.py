"""--bench (bench.py) and the command line's device check.  No timing is asserted."""
import pytest
import torch

import binary_ops as bo
import bench
from helpers import HAS_CUDA, needs_c, needs_cuda
from kernels import cuda as cuda_kernels


@needs_c
def test_bench_rows(capsys):
    rows = bench.bench_shape("cpu", 33, 200, 70)
    assert [r["kernel"] for r in rows] == ["baseline", "blas", "xnor"]
    for r in rows:
        assert {"device", "M", "K", "N", "kernel", "ms", "gops"} <= set(r) and r["ms"] > 0
    bench.print_bench_table(rows)
    assert "timed on 8 of 33 rows" in capsys.readouterr().out


@needs_cuda
def test_bench_rows_cuda():
    rows = bench.bench_shape("cuda", 33, 200, 70)
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
