"""`python binary_ops.py --bench`: the paper's kernel comparison (its "Run-time"
section): the baseline loop-nest GEMM, BLAS (torch.mm, float32) and the XNOR-popcount
GEMM on the GEMM shapes of the MNIST MLP and two large squares, on the CPU and on CUDA.

Also the timing helpers that --infer uses (time_ms, timed).
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import binary_net
from binary_ops import baseline_matmul, pack, pack_weights, xnor_matmul_packed
from kernels import cpu as cpu_kernels
from kernels import cuda as cuda_kernels


# ---------------------------------------------------------------------------
# Timing
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
# --bench
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
    # the weights packed and laid out once, before the timed calls, as
    # bnn-lab's prepacked call and a network at inference have them (a
    # vertical kernel then transposes nothing)
    weights = pack_weights(b_words, k)
    lay_out = lambda: pack_weights(b_words, k).layout_for(a_words)
    weights.layout_for(a_words)
    # both fast kernels write into outputs made once, as a GEMM inside a
    # network would: a fresh 64 MB output costs ~10% of the XNOR product in
    # page faults, 1% of the float one
    c_float = torch.empty(m, n, device=device)
    c_int = torch.empty(m, n, dtype=torch.int32, device=device)
    kernels = {"baseline": lambda: baseline_matmul(a_sub, b),
               "blas": lambda: torch.mm(a, b, out=c_float),
               "xnor": lambda: xnor_matmul_packed(a_words, weights, k, out=c_int)}
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
    layout_ms = time_ms({"layout": lay_out}, device, repeats_for(lay_out, device))["layout"]
    row("xnor", ms["xnor"], pack_ms=pack_ms, layout_ms=layout_ms)
    if "xnor_popc" in ms:
        row("xnor_popc", ms["xnor_popc"])
    return rows


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
            note = (f"packing both operands: {r['pack_ms']:.2f} ms, weights laid out: "
                    f"{r['layout_ms']:.2f} ms (not included: weights packed and laid out once, "
                    f"as bnn-lab's prepacked call)")
        print(f"{r['device']:6} {r['M']:>6} {r['K']:>5} {r['N']:>5}  {r['kernel']:8} "
              f"{r['ms']:>10.2f} {r['gops']:>8.1f} {speedup:>7.1f}x  {note}")


def run_bench(json_path, devices) -> int:
    lib = cpu_kernels.library()
    popcount = lib.bnn_popcount_kind().decode() if lib else "none (pure-PyTorch path)"
    print(f"CPU: {binary_net.cpu_name()}, {torch.get_num_threads()} threads; popcount: {popcount}; "
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
