"""Tests for datasets.py.

MNIST is checked on the real files (conftest's MNIST_DIR: ../shared/data/mnist) when present;
CIFAR-10 and SVHN on small files written here in their exact on-disk formats.
No test touches the network: urlopen is replaced for every test, and the
download tests serve local bytes through it.
"""

import gzip
import hashlib
import io
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import datasets
from conftest import MNIST_DIR
from datasets import DataError

# The files written here are not the published ones, so most loads warn about
# checksums; tests that care assert the warning with pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*(sha256|md5|cannot be read).*:UserWarning")

REAL_MNIST = MNIST_DIR   # conftest: ../shared/data/mnist beside the checkout
MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
needs_real_mnist = pytest.mark.skipif(
    not all((REAL_MNIST / (n + ".gz")).is_file() for n in MNIST_NAMES),
    reason="real MNIST files not present")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Point the cache into tmp_path and make any network access fail loudly."""
    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("BINARYNET_DATA", str(tmp_path / "cache"))


def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


class FakeResponse(io.BytesIO):
    """What urlopen returns, enough for the downloader."""

    def __init__(self, data, length=None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data) if length is None else length)}


def serve(monkeypatch, table):
    """Replace urlopen: URLs in ``table`` get their bytes (or raise the exception given)."""
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        answer = table.get(url, urllib.error.URLError("no route to host"))
        if isinstance(answer, Exception):
            raise answer
        return FakeResponse(*answer) if isinstance(answer, tuple) else FakeResponse(answer)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def files_in(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------

def idx_bytes(array):
    array = np.asarray(array, np.uint8)
    header = (0x800 + array.ndim).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.name.endswith(".gz") else data)
    return path


def write_small_mnist(folder, gz=True, n_train=10003, n_test=7):
    """Images whose first pixel is the image number (mod 256), labels number mod 10."""
    suffix = ".gz" if gz else ""
    images = np.zeros((n_train, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(n_train) % 256
    images[:, 27, 27] = np.arange(n_train) // 256
    test_images = np.full((n_test, 28, 28), 7, np.uint8)
    write(folder / ("train-images-idx3-ubyte" + suffix), idx_bytes(images))
    write(folder / ("train-labels-idx1-ubyte" + suffix), idx_bytes(np.arange(n_train) % 10))
    write(folder / ("t10k-images-idx3-ubyte" + suffix), idx_bytes(test_images))
    write(folder / ("t10k-labels-idx1-ubyte" + suffix), idx_bytes(np.arange(n_test) % 10))


@needs_real_mnist
def test_mnist_real_files_split_and_counts(recwarn):
    data = datasets.load_mnist(REAL_MNIST)
    assert not [w for w in recwarn if "sha256" in str(w.message)]  # recompressed copies verify
    sizes = {k: len(v[0]) for k, v in data.items()}
    assert sizes == {"train": 50000, "valid": 10000, "test": 10000}
    for X, y in data.values():
        assert X.dtype == np.uint8 and X.shape[1:] == (1, 28, 28) and X.flags.c_contiguous and X.flags.writeable
        assert y.dtype == np.int64 and len(y) == len(X)
    train_counts = np.bincount(np.concatenate([data["train"][1], data["valid"][1]]))
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(data["test"][1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_parses_gz_and_raw_idx_and_splits_last_10000(tmp_path, gz):
    write_small_mnist(tmp_path / "m", gz=gz)
    with pytest.warns(UserWarning, match="sha256"):  # not the published files
        data = datasets.load_mnist(tmp_path / "m")
    (X, y), (Xv, yv), (Xt, yt) = data["train"], data["valid"], data["test"]
    assert (len(X), len(Xv), len(Xt)) == (3, 10000, 7)
    number = lambda A: A[:, 0, 0, 0].astype(int) + 256 * A[:, 0, 27, 27].astype(int)
    assert number(X).tolist() == [0, 1, 2]
    assert number(Xv).tolist() == list(range(3, 10003))
    assert y.tolist() == [0, 1, 2] and (yv == np.arange(3, 10003) % 10).all()
    assert (Xt == 7).all() and yt.tolist() == list(range(7))


@needs_real_mnist
def test_mnist_uncompressed_copy_verifies_without_warning(tmp_path, recwarn):
    for name in MNIST_NAMES:
        write(tmp_path / name, gzip.decompress((REAL_MNIST / (name + ".gz")).read_bytes()))
    assert len(datasets.load_mnist(tmp_path)["test"][0]) == 10000
    assert not [w for w in recwarn if "sha256" in str(w.message)]


def test_mnist_missing_file(tmp_path):
    write_small_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        datasets.load_mnist(tmp_path)
    one_line_error(e, "t10k-labels-idx1-ubyte.gz", "--data-dir")


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:-100], ["truncated"]),
    (lambda b: b[:10], ["truncated"]),
    (lambda b: (0x803).to_bytes(4, "big") + b[4:], ["magic"]),
])
def test_mnist_bad_idx(tmp_path, damage, words):
    write_small_mnist(tmp_path, gz=False, n_train=10)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_mnist(tmp_path)
    one_line_error(e, str(path), *words)


def test_mnist_corrupt_gzip(tmp_path):
    write_small_mnist(tmp_path, n_train=10)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError) as e:
        datasets.load_mnist(tmp_path)
    one_line_error(e, str(path), "corrupt")
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError) as e:
        datasets.load_mnist(tmp_path)
    one_line_error(e, str(path), "corrupt")


def test_mnist_images_and_labels_must_agree(tmp_path):
    write_small_mnist(tmp_path, n_train=10)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.arange(6)))
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_mnist(tmp_path)
    one_line_error(e, "7 images", "6 labels")


@needs_real_mnist
def test_mnist_download_uses_next_mirror_verifies_and_caches(monkeypatch, tmp_path):
    table = {}
    for name in MNIST_NAMES:
        table["http://yann.lecun.com/exdb/mnist/" + name + ".gz"] = (REAL_MNIST / (name + ".gz")).read_bytes()
    requested = serve(monkeypatch, table)  # the first mirror fails, the second answers
    data = datasets.load_mnist()
    assert len(data["train"][0]) == 50000
    assert any("ossci-datasets" in url for url in requested)
    cache = datasets.cache_dir("mnist")
    assert files_in(cache) == sorted(n + ".gz" for n in MNIST_NAMES)  # no temporary left
    serve(monkeypatch, {})  # the second load must not download
    assert len(datasets.load_mnist(download=False)["valid"][0]) == 10000


def test_mnist_corrupt_download_leaves_nothing(monkeypatch):
    table = {m + n + ".gz": b"garbage" for m in datasets._MNIST_MIRRORS for n in MNIST_NAMES}
    serve(monkeypatch, table)
    with pytest.raises(DataError) as e:
        datasets.load_mnist()
    one_line_error(e, "could not download", "train-images-idx3-ubyte.gz", "--data-dir")
    assert files_in(datasets.cache_dir("mnist")) == []


def test_network_failure_is_one_line_error(monkeypatch):
    serve(monkeypatch, {})
    with pytest.raises(DataError) as e:
        datasets.load_svhn()
    one_line_error(e, "could not download", "train_32x32.mat", "no route to host",
                   str(datasets.cache_dir("svhn")), "--data-dir")
    assert files_in(datasets.cache_dir("svhn")) == []


def test_missing_cache_file_without_download():
    with pytest.raises(DataError) as e:
        datasets.load_mnist(download=False)
    one_line_error(e, "train-images-idx3-ubyte.gz", "missing", "--data-dir")


def test_cache_file_with_wrong_checksum_is_refused(tmp_path):
    write_small_mnist(datasets.cache_dir("mnist"), n_train=10)
    with pytest.raises(DataError) as e:
        datasets.load_mnist()
    one_line_error(e, "train-images-idx3-ubyte.gz", "delete it")


def test_unwritable_cache_is_one_line_error(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("BINARYNET_DATA", str(tmp_path / "a_file"))
    with pytest.raises(DataError) as e:
        datasets.load_mnist()
    one_line_error(e, "cannot write", "a_file", "--data-dir")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("BINARYNET_DATA", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert datasets.cache_dir("svhn") == tmp_path / "a" / "svhn"
    monkeypatch.delenv("BINARYNET_DATA")
    assert datasets.cache_dir("svhn") == tmp_path / "b" / "binarynet" / "svhn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.cache_dir("mnist") == tmp_path / "home" / ".cache" / "binarynet" / "mnist"


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(start, n):
    """A batch dict in the published layout; image k's pixel (c=2, h=3, w=4) holds k % 251."""
    numbers = np.arange(start, start + n)
    data = np.zeros((n, 3072), np.uint8)
    data[:, 0] = numbers % 256
    data[:, 1] = numbers // 256
    data[:, 2 * 1024 + 3 * 32 + 4] = numbers % 251
    return {b"batch_label": b"fake", b"labels": [int(k % 10) for k in numbers],
            b"data": data, b"filenames": [b"x.png"] * n}


def cifar_pickle(obj):
    # Protocol 2 and numpy.core names, as in the published (Python 2) files.
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def cifar_members(per_batch=1100, n_test=30):
    members = {name: cifar_pickle(cifar_batch(i * per_batch, per_batch))
               for i, name in enumerate(CIFAR_BATCHES[:5])}
    members["test_batch"] = cifar_pickle(cifar_batch(60000, n_test))
    members["batches.meta"] = cifar_pickle({b"label_names": [b"cat"] * 10})
    return members


def write_cifar_tar(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo("cifar-10-batches-py/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def check_cifar(data, per_batch=1100, n_test=30):
    (X, y), (Xv, yv), (Xt, yt) = data["train"], data["valid"], data["test"]
    assert (yt == np.arange(60000, 60000 + n_test) % 10).all()
    n = 5 * per_batch
    assert (len(X), len(Xv), len(Xt)) == (n - 5000, 5000, n_test)
    for A, b in data.values():
        assert A.dtype == np.uint8 and A.shape[1:] == (3, 32, 32) and A.flags.c_contiguous and A.flags.writeable
        assert b.dtype == np.int64
    number = lambda A: A[:, 0, 0, 0].astype(int) + 256 * A[:, 0, 0, 1].astype(int)
    assert (number(X) == np.arange(n - 5000)).all() and (number(Xv) == np.arange(n - 5000, n)).all()
    assert (y == np.arange(n - 5000) % 10).all() and (yv == np.arange(n - 5000, n) % 10).all()
    assert (number(Xt) == np.arange(60000, 60000 + n_test)).all()
    assert (X[:, 2, 3, 4] == np.arange(n - 5000) % 251).all()  # channel-major: (c, h, w)
    assert (Xt[:, 2, 3, 4] == np.arange(60000, 60000 + n_test) % 251).all()


def test_cifar_from_archive_split_and_layout(tmp_path):
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", cifar_members())
    with pytest.warns(UserWarning, match="md5"):
        check_cifar(datasets.load_cifar10(tmp_path))


def test_cifar_from_extracted_folder(tmp_path):
    for name, data in cifar_members().items():
        write(tmp_path / "cifar-10-batches-py" / name, data)
    with pytest.warns(UserWarning, match="md5"):
        check_cifar(datasets.load_cifar10(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        datasets.load_cifar10(tmp_path)
    one_line_error(e, "data_batch_3", "missing")


def test_cifar_download_with_patched_checksum(monkeypatch, tmp_path):
    archive = write_cifar_tar(tmp_path / "served.tar.gz", cifar_members()).read_bytes()
    remote = datasets._CIFAR_ARCHIVE
    monkeypatch.setattr(datasets, "_CIFAR_ARCHIVE", datasets._Remote(
        remote.name, remote.urls, "md5", hashlib.md5(archive).hexdigest()))
    serve(monkeypatch, {remote.urls[0]: archive})
    check_cifar(datasets.load_cifar10())
    assert files_in(datasets.cache_dir("cifar10")) == ["cifar-10-python.tar.gz"]


def test_cifar_truncated_download_leaves_nothing(monkeypatch, tmp_path):
    archive = write_cifar_tar(tmp_path / "served.tar.gz", cifar_members()).read_bytes()
    # The server promises the whole archive and stops half-way.
    serve(monkeypatch, {datasets._CIFAR_ARCHIVE.urls[0]: (archive[: len(archive) // 2], len(archive))})
    with pytest.raises(DataError) as e:
        datasets.load_cifar10()
    one_line_error(e, "could not download", "cifar-10-python.tar.gz")
    assert files_in(datasets.cache_dir("cifar10")) == []


def test_cifar_missing_archive(tmp_path):
    with pytest.raises(DataError) as e:
        datasets.load_cifar10(tmp_path)
    one_line_error(e, "cifar-10-python.tar.gz", "cs.toronto.edu", "--data-dir")


def test_cifar_truncated_archive(tmp_path):
    path = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", cifar_members())
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_cifar10(tmp_path)
    one_line_error(e, str(path))


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("data_batch_4"), ["lacks", "data_batch_4"]),
    (lambda m: m.update(test_batch=b"\x80\x02not a pickle"), ["test_batch", "not a readable"]),
    (lambda m: m.update(test_batch=cifar_pickle({b"data": np.zeros((3, 3072), np.uint8),
                                                 b"labels": [1, 2]})), ["test_batch", "labels"]),
    (lambda m: m.update(test_batch=cifar_pickle({b"data": np.zeros((3, 1024), np.uint8),
                                                 b"labels": [1, 2, 3]})), ["test_batch", "3072"]),
    (lambda m: m.update(test_batch=cifar_pickle({b"labels": []})), ["test_batch", "b'data'"]),
    (lambda m: m.update(test_batch=cifar_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                                 b"labels": [1, 10]})), ["test_batch", "0..9"]),
])
def test_cifar_bad_batches(tmp_path, change, words):
    members = cifar_members(per_batch=1001)
    change(members)
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_cifar10(tmp_path)
    one_line_error(e, *words)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    members = cifar_members(per_batch=1001)
    members["data_batch_1"] = pickle.dumps({b"data": Exploit()}, protocol=2)
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_cifar10(tmp_path)
    one_line_error(e, "data_batch_1", "refusing")


def test_cifar_too_few_images_for_the_split(tmp_path):
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", cifar_members(per_batch=1000))
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_cifar10(tmp_path)
    one_line_error(e, "5000 images")


# ---------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------

def svhn_images(file_number, labels):
    """32 x 32 x 3 x N uint8 as in the .mat files; each image says which file and index it is,
    and pixel (h=5, w=7, c=2) holds index % 253."""
    n = len(labels)
    X = np.zeros((32, 32, 3, n), np.uint8)
    X[0, 0, 0] = np.arange(n) % 256
    X[0, 0, 1] = np.arange(n) // 256
    X[0, 0, 2] = file_number
    X[5, 7, 2] = np.arange(n) % 253
    return X


def svhn_labels(per_class, seed):
    labels = np.repeat(np.arange(1, 11), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def write_svhn(folder, train=410, extra=210, test=30, override=None):
    override = override or {}
    folder.mkdir(parents=True, exist_ok=True)
    for number, (name, per_class) in enumerate([("train", train), ("extra", extra), ("test", test)]):
        y = svhn_labels(per_class, number)
        variables = {"X": svhn_images(number, y), "y": y.reshape(-1, 1).astype(np.uint8)}
        variables.update(override.get(name, {}))
        scipy.io.savemat(folder / f"{name}_32x32.mat", variables, do_compression=True)
    return folder


def identify(X):
    """(file number, index in file) of each image made by svhn_images."""
    return X[:, 2, 0, 0].astype(int), X[:, 0, 0, 0].astype(int) + 256 * X[:, 1, 0, 0].astype(int)


def pylearn2_valid_indices(labels_by_file, per_class_by_file):
    """Restates pylearn2's pick (svhn.py, split_train_valid) to pin ours to it."""
    rng = np.random.RandomState(322)
    picked = []
    for labels, per_class in zip(labels_by_file, per_class_by_file):
        chosen = set()
        for label in range(1, 11):
            index = np.nonzero(labels.reshape(-1, 1) == label)[0]
            rng.shuffle(index)
            chosen.update(index[:per_class].tolist())
        picked.append(chosen)
    return picked


@pytest.fixture(scope="module")
def svhn(tmp_path_factory):
    folder = write_svhn(tmp_path_factory.mktemp("svhn"))
    with pytest.warns(UserWarning, match="md5"):
        return datasets.load_svhn(folder)


def test_svhn_split_sizes_types_and_layout(svhn):
    X, Xv, Xt = svhn["train"][0], svhn["valid"][0], svhn["test"][0]
    assert (len(X), len(Xv), len(Xt)) == (4100 + 2100 - 6000, 6000, 300)
    for A, b in svhn.values():
        assert A.dtype == np.uint8 and A.shape[1:] == (3, 32, 32) and A.flags.c_contiguous and A.flags.writeable
        assert b.dtype == np.int64 and len(b) == len(A) and set(b.tolist()) <= set(range(10))
    labels = [svhn_labels(410, 0), svhn_labels(210, 1), svhn_labels(30, 2)]
    for A, b in svhn.values():
        files, index = identify(A)
        assert (A[:, 2, 5, 7] == index % 253).all()  # .mat pixel (h, w, c) lands at (c, h, w)
        expected = np.array([labels[f][i] for f, i in zip(files, index)]) % 10  # label 10 is digit 0
        assert (b == expected).all()
    files, index = identify(Xt)
    assert (files == 2).all() and (index == np.arange(300)).all()


def test_svhn_validation_is_pylearn2_pick(svhn):
    X, (Xv, yv) = svhn["train"][0], svhn["valid"]
    files, index = identify(Xv)
    for number, per_class in [(0, 400), (1, 200)]:
        assert np.bincount(yv[files == number], minlength=10).tolist() == [per_class] * 10
    picked = pylearn2_valid_indices([svhn_labels(410, 0), svhn_labels(210, 1)], [400, 200])
    for number in (0, 1):
        assert set(index[files == number].tolist()) == picked[number]
    # train is everything else, once, train file first, each in file order
    files_t, index_t = identify(X)
    for number, n in [(0, 4100), (1, 2100)]:
        rest = sorted(set(range(n)) - picked[number])
        assert index_t[files_t == number].tolist() == rest
    assert (np.diff(files_t) >= 0).all()


@pytest.mark.parametrize("name, variables, words", [
    ("train", {"y": np.zeros((4100, 1), np.uint8)}, ["train_32x32.mat", "1..10"]),
    ("extra", {"y": np.full((2100, 1), 11, np.uint8)}, ["extra_32x32.mat", "1..10"]),
    ("test", {"X": np.zeros((32, 32, 3, 30), np.float32)}, ["test_32x32.mat", "uint8"]),
    ("test", {"X": np.zeros((32, 32, 30), np.uint8)}, ["test_32x32.mat", "32 x 32 x 3 x N"]),
    ("test", {"y": np.ones((29, 1), np.uint8)}, ["test_32x32.mat", "N x 1"]),
])
def test_svhn_bad_contents(tmp_path, name, variables, words):
    write_svhn(tmp_path, override={name: variables})
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_svhn(tmp_path)
    one_line_error(e, *words)


def test_svhn_missing_variable(tmp_path):
    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_svhn(tmp_path)
    one_line_error(e, "test_32x32.mat", "lacks")


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"not a MATLAB file" * 20])
def test_svhn_corrupt_mat(tmp_path, damage):
    write_svhn(tmp_path)
    path = tmp_path / "extra_32x32.mat"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_svhn(tmp_path)
    one_line_error(e, str(path), "not a readable MATLAB file")


def test_svhn_too_few_of_a_class(tmp_path):
    write_svhn(tmp_path, extra=199)
    with pytest.raises(DataError) as e, pytest.warns(UserWarning):
        datasets.load_svhn(tmp_path)
    one_line_error(e, "extra_32x32.mat", "needs 200")


def test_svhn_missing_file(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "extra_32x32.mat").unlink()
    with pytest.raises(DataError) as e:
        datasets.load_svhn(tmp_path)
    one_line_error(e, "extra_32x32.mat", "ufldl.stanford.edu", "--data-dir")


def test_svhn_test_split_alone_equals_load_svhns_and_reads_only_its_file(svhn, tmp_path):
    """1-bit inference reads SVHN's test split alone: the same arrays as load_svhn's,
    from test_32x32.mat only (train and extra may be absent)."""
    folder = write_svhn(tmp_path / "svhn")
    (folder / "train_32x32.mat").unlink()
    (folder / "extra_32x32.mat").unlink()
    with pytest.warns(UserWarning, match="md5"):
        alone = datasets.load_svhn_test(folder, download=False)
    assert set(alone) == {"test"}
    for a, b in zip(alone["test"], svhn["test"]):
        np.testing.assert_array_equal(a, b)
