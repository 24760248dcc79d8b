import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the flat scripts import as modules, as a user runs them

# The real MNIST lies beside the checkout (../shared/data/mnist); BINARYNET_MNIST overrides.
MNIST_DIR = Path(os.environ.get("BINARYNET_MNIST", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists() and not (MNIST_DIR / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST not found in {MNIST_DIR} (set BINARYNET_MNIST)")
    return MNIST_DIR
