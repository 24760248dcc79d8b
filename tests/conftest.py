import os
import sys
from pathlib import Path

import pytest

from helpers import HAS_C

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the flat scripts import as modules, as a user runs them

# The real MNIST lies beside the checkout (../shared/data/mnist); BINARYNET_MNIST overrides.
MNIST_DIR = Path(os.environ.get("BINARYNET_MNIST", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists() and not (MNIST_DIR / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST not found in {MNIST_DIR} (set BINARYNET_MNIST)")
    return MNIST_DIR


@pytest.fixture(params=["c_tiled", "c_baseline", "torch"])
def cpu_path(request, monkeypatch):
    """Each CPU code path in turn, as the kernel argument of xnor_matmul."""
    if request.param.startswith("c_") and not HAS_C:
        pytest.skip("no C compiler")
    if request.param == "torch":
        monkeypatch.setenv("BINARYNET_PURE_TORCH", "1")
    return "baseline" if request.param == "c_baseline" else "xnor"
