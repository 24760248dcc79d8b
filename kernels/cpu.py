"""Build, cache, choose and call the C kernels of kernels/xnor_cpu.c.

Like the reference implementation, which compiled its kernel at run time, the
C source is compiled at first use on the user's own machine: its common part
(the reference kernel, the dispatch, the thread pool) once with portable
flags, and its kernels once per instruction set (on x86: scalar popcnt, AVX2
and AVX-512 VPOPCNTDQ, each at a fixed -march level tuned for this CPU;
elsewhere -march=native; portable flags where no object builds, said once),
linked into one library.  The C side runs an object only on a CPU with every
feature it was compiled for.  The library is cached in ~/.cache/binarynet (or
$BINARYNET_CACHE) under a name keyed by a hash of the source, the compiler
commands and the CPU, so an edit of the source or a move to another machine
rebuilds it.  It is written to a temporary file and renamed, so concurrent
first uses never load half a file.

The kernel for each class of product (rows, words of K, rows of B, bit
planes or not: bnn_product_class) is chosen by timing the candidates this CPU
runs on a slice of the first product of that class (a few ms), and the order
found is cached beside the library, keyed the same way
(xnor_cpu-<key>.choice.json), so it is measured again when the source or the
CPU changes; within the file each order is keyed by its class's ranges
(bnn_class_name), so that an order measured under other class edges is never
read.
BINARYNET_KERNEL=name forces a kernel (for tests and the benchmark; "default"
takes xnor_cpu.c's default table); a kernel the CPU cannot run is an error,
never a call.  BINARYNET_ISA=scalar or avx2 leaves the later x86 objects out of
the build: what a CPU without them runs, measured on one that has them.

`library()` returns None, after a one-line warning, when no compiler is found
or the build fails; callers then take the pure-PyTorch path.  Setting
BINARYNET_PURE_TORCH=1 forces that path (the tests use it).
"""
import ctypes
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from kernels import check_row_class, words

SOURCE = Path(__file__).with_name("xnor_cpu.c")
COMMON_FLAGS = ["-O3", "-fPIC", "-pthread"]
# The kernel objects on x86 (BNN_ISA: flags); each runs only where the CPU has
# every feature of its level (the C side checks).
X86_OBJECTS = {
    "scalar": ["-march=x86-64-v2", "-mtune=native"],
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
    "avx512": ["-march=x86-64-v4", "-mavx512vpopcntdq", "-mtune=native"],
}
NATIVE_FLAGS = ["-march=native"]        # other machines: one object, for this CPU
KERNEL_ENV = "BINARYNET_KERNEL"
# BINARYNET_ISA=avx2 builds the x86 objects up to avx2 only: the library (and its
# measured choice) that a CPU without AVX-512 gets, on any x86 machine.
ISA_ENV = "BINARYNET_ISA"
# Options of bnn_xnor_gemm_kernel (OPT_* in xnor_cpu.c).
NO_WORK_BUFFERS, STREAM, NO_STREAM = 1, 2, 4
# The slice of a product that the choice is timed on (rows of A, rows of B
# and words of K at most: its work), and the calls per candidate (the first
# one warms up).
MEASURE_ROWS, MEASURE_COLS, MEASURE_WORDS, MEASURE_CALLS = 64, 512, 32, 3


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "binarynet"
    return Path(os.environ.get("BINARYNET_CACHE", default))


def cpu_signature() -> str:
    """The CPU's feature flags, so that a cached build never runs on a CPU
    that lacks an instruction it uses (shared home folders)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def x86_objects() -> dict:
    """X86_OBJECTS up to BINARYNET_ISA's (all of them where it is unset)."""
    top, names = os.environ.get(ISA_ENV, ""), list(X86_OBJECTS)
    if top and top not in names:
        warn(f"{ISA_ENV}={top} is not one of {', '.join(names)}; building them all")
    last = names.index(top) if top in names else len(names) - 1
    return {isa: X86_OBJECTS[isa] for isa in names[:last + 1]}


def object_commands(compiler: str, folder: Path) -> dict:
    """The compile command of each kernel object, by instruction set."""
    if platform.machine() in ("x86_64", "AMD64"):
        objects = x86_objects()
    else:
        objects = {"scalar": NATIVE_FLAGS}
    return {isa: [compiler, *COMMON_FLAGS, *flags, "-DBNN_PART_KERNELS", f"-DBNN_ISA={isa}",
                  "-c", str(SOURCE), "-o", str(folder / f"{isa}.o")]
            for isa, flags in objects.items()}


def compile_objects(commands: dict) -> tuple:
    """Run the compile commands at once; returns the objects built and the
    error of each that failed."""
    running = {isa: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for isa, c in commands.items()}
    built, failed = [], {}
    for isa, process in running.items():
        _, err = process.communicate()
        if process.returncode == 0:
            built.append(commands[isa][-1])
        else:
            failed[isa] = (err or "").strip().splitlines()[:1]
    return built, failed


def build(compiler: str) -> Path:
    """Compile xnor_cpu.c into the cache unless an identical build is there:
    the common part, the kernel objects, one library."""
    key = hashlib.sha256(SOURCE.read_bytes())
    for command in object_commands(compiler, Path(".")).values():
        key.update(" ".join(command[:-4]).encode())
    key.update(" ".join([compiler, *COMMON_FLAGS]).encode())
    key.update(cpu_signature().encode())
    target = cache_dir() / f"xnor_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        folder = Path(folder)
        common = [compiler, *COMMON_FLAGS, "-DBNN_PART_COMMON", "-c", str(SOURCE),
                  "-o", str(folder / "common.o")]
        commands = object_commands(compiler, folder)
        built, failed = compile_objects({"common": common, **commands})
        if "common" in failed:
            raise subprocess.CalledProcessError(1, common, stderr="\n".join(failed["common"]))
        if len(built) == 1:         # no kernel object (-march=native failed, an old compiler)
            portable = [compiler, *COMMON_FLAGS, "-DBNN_PART_KERNELS", "-DBNN_ISA=scalar", "-c",
                        str(SOURCE), "-o", str(folder / "scalar.o")]
            more, _ = compile_objects({"scalar": portable})
            if not more:
                error = next(iter(failed.values()))
                raise subprocess.CalledProcessError(1, portable, stderr="\n".join(error))
            built += more
            warn(f"{SOURCE.name}'s kernels did not build for this CPU "
                 f"({' '.join(next(iter(failed.values())))}); built with portable flags")
        else:
            for isa, error in failed.items():
                warn(f"the {isa} kernels of {SOURCE.name} did not build ({' '.join(error)}); "
                     "the library goes without them")
        partial = folder / "partial.so"
        subprocess.run([compiler, "-shared", "-pthread", *built, "-o", str(partial)],
                       check=True, capture_output=True, text=True)
        os.replace(partial, target)
    return target


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, n, i, s = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_char_p
    lib.bnn_pack.argtypes = [ptr, ptr, n, n, i]
    lib.bnn_pack_planes.argtypes = [ptr, ptr, n, n, i]
    lib.bnn_xnor_gemm.argtypes = [ptr, ptr, n, n, n, n, ptr, ptr, ptr, i]
    lib.bnn_xnor_gemm_kernel.argtypes = [i, i, ptr, ptr, ptr, n, n, n, n, ptr, ptr, ptr, i]
    lib.bnn_layout_bytes.argtypes, lib.bnn_layout_bytes.restype = [i, n, n], n
    lib.bnn_make_layout.argtypes, lib.bnn_make_layout.restype = [i, ptr, n, n, ptr, i], i
    lib.bnn_baseline_gemm.argtypes = [ptr, ptr, ptr, n, n, n, i]
    for f in (lib.bnn_pack, lib.bnn_pack_planes, lib.bnn_xnor_gemm, lib.bnn_baseline_gemm):
        f.restype = None
    for f in (lib.bnn_product_class, lib.bnn_default_kernel):
        f.argtypes, f.restype = [n, n, n, n], i
    for f in (lib.bnn_kernel_serves, lib.bnn_kernel_pays, lib.bnn_kernel_may_pay):
        f.argtypes, f.restype = [i, n, n, n, n], i
    lib.bnn_class_count.argtypes, lib.bnn_class_count.restype = [], i
    lib.bnn_class_name.argtypes, lib.bnn_class_name.restype = [i, s, n], None
    lib.bnn_kernel_count.argtypes, lib.bnn_kernel_count.restype = [], i
    lib.bnn_kernel_name.argtypes, lib.bnn_kernel_name.restype = [i], s
    lib.bnn_kernel_runs.argtypes, lib.bnn_kernel_runs.restype = [i], i
    lib.bnn_xnor_gemm_kernel.restype = i
    lib.bnn_popcount_kind.argtypes, lib.bnn_popcount_kind.restype = [], s
    return lib


@functools.cache
def _load():
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        warn(f"no C compiler ({compiler}) found; using the slow pure-PyTorch XNOR path")
        return None
    try:
        path = build(compiler)
        lib = declare(ctypes.CDLL(str(path)))
    except subprocess.CalledProcessError as e:
        first = (e.stderr or "").strip().splitlines()[:1]
        warn(f"building {SOURCE.name} failed ({' '.join(first)}); using the pure-PyTorch path")
        return None
    except OSError as e:
        warn(f"loading the {SOURCE.name} build failed ({e}); using the pure-PyTorch path")
        return None
    if not lib.bnn_popcount_kind():
        warn(f"no kernel of {SOURCE.name} runs on this CPU; using the pure-PyTorch path")
        return None
    lib.binarynet_choices = Choices(path.with_suffix(".choice.json"), class_names(lib))
    return lib


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
    out = torch.empty(rows, words(k), dtype=torch.int64)
    lib.bnn_pack(x.data_ptr(), out.data_ptr(), rows, k, threads())
    return out


def pack_planes(lib, x: torch.Tensor) -> torch.Tensor:
    """x: rows x K uint8, contiguous.  Returns (8 rows) x ceil(K/64) words."""
    rows, k = x.shape
    out = torch.empty(8 * rows, words(k), dtype=torch.int64)
    lib.bnn_pack_planes(x.data_ptr(), out.data_ptr(), rows, k, threads())
    return out


def kernel_names(lib) -> list:
    """Every kernel of the library, runnable here or not, in xnor_cpu.c's
    order (read once per library: the choice runs before every product)."""
    try:
        return lib.binarynet_names
    except AttributeError:
        lib.binarynet_names = [lib.bnn_kernel_name(i).decode() for i in range(lib.bnn_kernel_count())]
        return lib.binarynet_names


def runnable_kernels(lib) -> list:
    """The kernels this CPU runs (the reference included)."""
    return [name for i, name in enumerate(kernel_names(lib)) if lib.bnn_kernel_runs(i)]


def kernel_index(lib, name: str) -> int:
    """The index of a kernel by name; ValueError for an unknown one or one
    this CPU cannot run."""
    names = kernel_names(lib)
    if name not in names:
        raise ValueError(f"unknown kernel {name!r} (kernels: {', '.join(names)})")
    if not lib.bnn_kernel_runs(names.index(name)):
        raise ValueError(f"kernel {name!r} cannot run on this CPU "
                         f"(it runs: {', '.join(runnable_kernels(lib))})")
    return names.index(name)


def class_names(lib) -> list:
    """The name of every class of product (bnn_class_name), by class."""
    names = []
    for c in range(lib.bnn_class_count()):
        name = ctypes.create_string_buffer(96)
        lib.bnn_class_name(c, name, len(name))
        names.append(name.value.decode())
    return names


def class_name(lib, m: int, n: int, k: int, planes: int) -> str:
    """The class of a product by name: the key of its measured order."""
    return lib.binarynet_choices.names[lib.bnn_product_class(m, n, k, planes)]


class Choices:
    """The measured order of the kernels for each class of product, kept in
    a JSON file beside the library (same key: rebuilt, re-measured), keyed
    by the class's name: keys of other class edges (an older layout) are
    never read, and dropped when the file is next written."""

    def __init__(self, path: Path, names: list):
        self.path = path
        self.names = names
        self.lock = threading.Lock()
        try:
            self.order = json.loads(path.read_text())
        except (OSError, ValueError):
            self.order = {}

    def save(self, product_class: str, order: list) -> None:
        """Merge into the file (other processes may have measured other
        classes), written to a temporary file and renamed."""
        self.order[product_class] = order
        try:
            merged = json.loads(self.path.read_text())
        except (OSError, ValueError):
            merged = {}
        merged.update(self.order)
        merged = {name: merged[name] for name in self.names if name in merged}
        try:
            fd, partial = tempfile.mkstemp(suffix=".json", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(partial, self.path)
        except OSError as e:        # a read-only cache: the order holds for this process
            warn(f"could not save the kernel choice ({e}); it is measured again next time")


def measure_order(lib, a, b, k: int, planes: int) -> list:
    """The kernels this CPU runs that serve the product and pay for some N
    of its class (but the reference), fastest first, timed on a slice of it:
    its own rows of B up to MEASURE_COLS (the order moves with N), at most
    MEASURE_WORDS words of K (257 where K is past what the vertical kernels
    take, so that the slice stays in the product's class of K) and as many
    rows of A as make the work of MEASURE_ROWS x MEASURE_COLS rows of
    MEASURE_WORDS words.  Each candidate: MEASURE_CALLS calls on one thread,
    the least CPU time of the calling thread of all but the first: on a busy
    machine, the time another process holds the core does not count
    (wall-clock times of 0.1 ms calls there were 2-16 ms, any order)."""
    kw = a.shape[1]
    words = kw if kw <= MEASURE_WORDS else MEASURE_WORDS if kw <= 256 else 257
    cols = min(b.shape[0], MEASURE_COLS)
    rows = MEASURE_ROWS * MEASURE_COLS * MEASURE_WORDS // (cols * words)
    m = max(1, min(a.shape[0], rows) // planes)
    a = a[: m * planes, :words].contiguous()
    b = b[:cols, :words].contiguous()
    k = min(k, 64 * words)
    out = torch.empty(m, cols, dtype=torch.int32)
    names = kernel_names(lib)
    times = {}
    for i, name in enumerate(names):
        if name == "reference" or not lib.bnn_kernel_serves(i, m, cols, k, planes) or \
                not lib.bnn_kernel_may_pay(i, m, cols, k, planes):
            continue
        best = float("inf")
        for call in range(MEASURE_CALLS):
            start = time.thread_time()
            lib.bnn_xnor_gemm_kernel(i, 0, a.data_ptr(), b.data_ptr(), None, m, cols, k, planes,
                                     None, None, out.data_ptr(), 1)
            if call > 0:
                best = min(best, time.thread_time() - start)
        times[name] = best
    return sorted(times, key=times.get)


def forced_kernel() -> str:
    """BINARYNET_KERNEL's value ("" where unset)."""
    return os.environ.get(KERNEL_ENV, "")


def chosen_kernel(lib, a, b, m: int, n: int, k: int, planes: int) -> int:
    """The kernel for a product: BINARYNET_KERNEL's where it serves it, else
    the fastest measured for its class that pays (a vertical kernel: B not
    mostly padding), else the default table's."""
    forced = forced_kernel()
    if forced == "default":
        return lib.bnn_default_kernel(m, n, k, planes)
    if forced:
        index = kernel_index(lib, forced)
        if lib.bnn_kernel_serves(index, m, n, k, planes):
            return index
    choices = lib.binarynet_choices
    product_class = class_name(lib, m, n, k, planes)
    order = choices.order.get(product_class)
    if order is None:
        with choices.lock:
            order = choices.order.get(product_class)
            if order is None:
                order = measure_order(lib, a, b, k, planes)
                choices.save(product_class, order)
    names = kernel_names(lib)
    for name in order:
        if name in names and lib.bnn_kernel_pays(names.index(name), m, n, k, planes):
            return names.index(name)
    return lib.bnn_default_kernel(m, n, k, planes)


def make_layout(lib, b, k: int, kernel: int):
    """B (N x KW words, contiguous) laid out once for a vertical kernel (by
    index; bnn_make_layout): a uint8 tensor to pass to xnor_gemm with this
    same B, or None where the kernel takes no layout (it does not transpose
    B)."""
    size = lib.bnn_layout_bytes(kernel, b.shape[0], k)
    if size == 0:
        return None
    layout = torch.empty(size + 63, dtype=torch.uint8)   # the C side wants 64-byte alignment
    start = -layout.data_ptr() % 64
    layout = layout[start:start + size]
    if lib.bnn_make_layout(kernel, b.data_ptr(), b.shape[0], k, layout.data_ptr(), threads()) != 0:
        raise RuntimeError(f"bnn_make_layout refused kernel {kernel_names(lib)[kernel]!r}")
    return layout


def layout_made_for(lib, layout) -> str:
    """What a layout was made for, in words (its header: magic, kernel, N, K)."""
    if layout.dtype != torch.uint8 or layout.numel() < 32 or layout[:8].tolist() != list(b"BNLAYRN1"):
        return "no product (it is not a layout that make_layout made)"
    _, kernel, n, k = layout[:32].view(torch.int64).tolist()
    names = kernel_names(lib)
    name = names[kernel] if 0 <= kernel < len(names) else f"#{kernel}"
    return f"kernel {name!r}, N={n}, K={k}"


def xnor_gemm(lib, a, b, k: int, planes: int, threshold=None, out=None, kernel=None,
              options: int = 0, row_class=None, layout=None) -> torch.Tensor:
    """a: (M planes) x KW words, b: N x KW words, threshold: N or classes x N
    int32 or None, row_class: M uint8 or None, all contiguous.  Returns M x N
    int32 dot products, or with a threshold the M x ceil(N/64) packed
    activations, row i against the thresholds of class row_class[i] (class 0
    without row_class; see bnn_xnor_gemm_kernel; check_row_class checks the
    classes), in `out` if given (contiguous, of that shape and dtype: the
    caller checks).
    kernel: a kernel's name (ValueError where this CPU cannot run it or it
    cannot take the product), else the chosen one (chosen_kernel);
    options: NO_WORK_BUFFERS, STREAM, NO_STREAM (for the tests);
    layout: B laid out by make_layout for the kernel that runs, or None
    (ValueError where it was made for another kernel or shape)."""
    if planes not in (1, 8):
        raise ValueError(f"planes must be 1 or 8, got {planes}")
    m, n = a.shape[0] // planes, b.shape[0]
    if out is None:
        cols, dtype = (n, torch.int32) if threshold is None else ((n + 63) // 64, torch.int64)
        out = torch.empty(m, cols, dtype=dtype)
    if m == 0 or n == 0:
        return out
    if threshold is not None:
        check_row_class(threshold, row_class, m, n)
    index = chosen_kernel(lib, a, b, m, n, k, planes) if kernel is None else kernel_index(lib, kernel)
    fits = layout is None or (layout.dtype == torch.uint8 and layout.is_contiguous() and
                              layout.numel() == lib.bnn_layout_bytes(index, n, k))
    status = -2 if not fits else lib.bnn_xnor_gemm_kernel(
        index, options, a.data_ptr(), b.data_ptr(), None if layout is None else layout.data_ptr(),
        m, n, k, planes, None if threshold is None else threshold.data_ptr(),
        None if row_class is None else row_class.data_ptr(), out.data_ptr(), threads())
    if status == -2:
        raise ValueError(f"the layout of B was made for {layout_made_for(lib, layout)}, not for "
                         f"kernel {kernel_names(lib)[index]!r}, N={n}, K={k}")
    if status != 0:
        raise ValueError(f"kernel {kernel!r} cannot take rows of {(k + 63) // 64} words")
    return out


def baseline_gemm(lib, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: M x K, b: K x N float32, contiguous.  Returns a @ b by the loop nest."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    lib.bnn_baseline_gemm(a.data_ptr(), b.data_ptr(), out.data_ptr(),
                          a.shape[0], b.shape[1], a.shape[1], threads())
    return out
