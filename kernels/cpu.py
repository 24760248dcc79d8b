"""Build, cache and call the C kernels of kernels/xnor_cpu.c.

Like the reference implementation, which compiled its kernel at run time, the
C source is compiled at first use on the user's own machine, with
-march=native so that the fastest popcount of that CPU is used.  The shared
library is cached in ~/.cache/binarynet (or $BINARYNET_CACHE) under a name
keyed by a hash of the source, the compiler command and the CPU, so an edit
of the source or a move to another machine rebuilds it.  It is written to a
temporary file and renamed, so concurrent first uses never load half a file.

`library()` returns None, after a one-line warning, when no compiler is found
or the build fails; callers then take the pure-PyTorch path.  Setting
BINARYNET_PURE_TORCH=1 forces that path (the tests use it).
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("xnor_cpu.c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "binarynet"
    return Path(os.environ.get("BINARYNET_CACHE", default))


def cpu_signature() -> str:
    """The CPU's feature flags, so that a cached -march=native build never
    runs on a CPU that lacks an instruction it uses (shared home folders)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def build(compiler: str) -> Path:
    """Compile xnor_cpu.c into the cache unless an identical build is there."""
    command = [compiler, *FLAGS]
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join(command).encode())
    key.update(cpu_signature().encode())
    target = cache_dir() / f"xnor_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*command, str(SOURCE), "-o", partial],
                       check=True, capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, n = ctypes.c_void_p, ctypes.c_long
    lib.bnn_pack.argtypes = [ptr, ptr, n, n, ctypes.c_int]
    lib.bnn_pack_planes.argtypes = [ptr, ptr, n, n, ctypes.c_int]
    lib.bnn_xnor_gemm.argtypes = [ptr, ptr, n, n, n, n, ptr, ptr, ctypes.c_int]
    lib.bnn_baseline_gemm.argtypes = [ptr, ptr, ptr, n, n, n, ctypes.c_int]
    lib.bnn_use_work_buffers.argtypes = [ctypes.c_int]
    lib.bnn_stream_outputs.argtypes = [ctypes.c_int]
    lib.bnn_use_vertical.argtypes = [ctypes.c_int]
    for f in (lib.bnn_pack, lib.bnn_pack_planes, lib.bnn_xnor_gemm, lib.bnn_baseline_gemm,
              lib.bnn_use_work_buffers, lib.bnn_stream_outputs, lib.bnn_use_vertical):
        f.restype = None
    lib.bnn_popcount_kind.argtypes = []
    lib.bnn_popcount_kind.restype = ctypes.c_char_p
    return lib


@functools.cache
def _load():
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        warn(f"no C compiler ({compiler}) found; using the slow pure-PyTorch XNOR path")
        return None
    try:
        return declare(ctypes.CDLL(str(build(compiler))))
    except subprocess.CalledProcessError as e:
        first = (e.stderr or "").strip().splitlines()[:1]
        warn(f"building {SOURCE.name} failed ({' '.join(first)}); using the pure-PyTorch path")
    except OSError as e:
        warn(f"loading the {SOURCE.name} build failed ({e}); using the pure-PyTorch path")
    return None


def library():
    """The loaded C library, or None where the pure-PyTorch path must run."""
    if os.environ.get("BINARYNET_PURE_TORCH") == "1":
        return None
    return _load()


def warn(message: str) -> None:
    print(f"binary_ops: warning: {message}", file=sys.stderr)


def threads() -> int:
    return torch.get_num_threads()


def pack(lib, x: torch.Tensor) -> torch.Tensor:
    """x: rows x K float32, contiguous.  Returns rows x ceil(K/64) int64 words."""
    rows, k = x.shape
    out = torch.empty(rows, (k + 63) // 64, dtype=torch.int64)
    lib.bnn_pack(x.data_ptr(), out.data_ptr(), rows, k, threads())
    return out


def pack_planes(lib, x: torch.Tensor) -> torch.Tensor:
    """x: rows x K uint8, contiguous.  Returns (8 rows) x ceil(K/64) words."""
    rows, k = x.shape
    out = torch.empty(8 * rows, (k + 63) // 64, dtype=torch.int64)
    lib.bnn_pack_planes(x.data_ptr(), out.data_ptr(), rows, k, threads())
    return out


def xnor_gemm(lib, a, b, k: int, planes: int, threshold=None, out=None) -> torch.Tensor:
    """a: (M planes) x KW words, b: N x KW words, threshold: N int32 or None,
    all contiguous.  Returns M x N int32 dot products, or with a threshold the
    M x ceil(N/64) packed activations (see bnn_xnor_gemm), in `out` if given
    (contiguous, of that shape and dtype: the caller checks)."""
    if planes not in (1, 8):
        raise ValueError(f"planes must be 1 or 8, got {planes}")
    m, n = a.shape[0] // planes, b.shape[0]
    if out is None:
        cols, dtype = (n, torch.int32) if threshold is None else ((n + 63) // 64, torch.int64)
        out = torch.empty(m, cols, dtype=dtype)
    lib.bnn_xnor_gemm(a.data_ptr(), b.data_ptr(), m, n, k, planes,
                      None if threshold is None else threshold.data_ptr(),
                      out.data_ptr(), threads())
    return out


def baseline_gemm(lib, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: M x K, b: K x N float32, contiguous.  Returns a @ b by the loop nest."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    lib.bnn_baseline_gemm(a.data_ptr(), b.data_ptr(), out.data_ptr(),
                          a.shape[0], b.shape[1], a.shape[1], threads())
    return out
