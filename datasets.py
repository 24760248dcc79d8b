"""MNIST, CIFAR-10 and SVHN for the BinaryNet reproduction.

The authors' Theano scripts got their data from pylearn2; this module plays that
part.  Each loader returns ``{'train': (X, y), 'valid': (X, y), 'test': (X, y)}``
with X a C-contiguous uint8 array N x C x H x W and y int64 class indices 0..9,
split exactly as the reference scripts split them.  Pixels stay uint8 (the
training loop scales them to [-1, 1] batch by batch, so SVHN fits in memory).

Where the files come from:

* ``data_dir`` given: the files are read from there and nothing is downloaded.
  A file whose checksum differs from the published one only draws a warning, so
  re-packed copies still work.
* ``data_dir=None``: the files live in ``cache_dir(name)``.  Missing ones are
  downloaded (when ``download`` is true) from the canonical source, verified,
  and only then moved into place.  A cached file with a wrong checksum is an
  error: delete it and the next run downloads a fresh copy.

Every user-facing problem raises ``DataError`` whose message is one line naming
the file and what to do.
"""

import gzip
import hashlib
import http.client
import os
import pickle
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataError", "cache_dir", "load_cifar10", "load_mnist", "load_svhn"]


class DataError(Exception):
    """A problem with the data files that the user can fix; the message is one line."""

    def __init__(self, message):
        # Reasons quoted from other exceptions may span lines; keep ours on one.
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------
# Fetching and verifying files (shared by the three loaders)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Remote:
    """One published file: its name, where to get it and its checksum.

    With ``gunzip`` the digest is over the decompressed bytes, so a recompressed
    copy passes, and the uncompressed file (the name without ``.gz``) is
    accepted in its place.
    """

    name: str
    urls: tuple
    algo: str
    digest: str
    gunzip: bool = False

    def local_names(self):
        return (self.name, self.name[: -len(".gz")]) if self.gunzip else (self.name,)


_CHUNK = 1 << 20


def cache_dir(name):
    """Per-user folder for data set ``name``.

    ``$BINARYNET_DATA/<name>`` when that variable is set (so it can point at a
    shared read-only copy laid out as ``mnist/``, ``cifar10/``, ``svhn/``),
    else ``$XDG_CACHE_HOME/binarynet/<name>``, else ``~/.cache/binarynet/<name>``.
    The folder is only created when something is downloaded into it.
    """
    root = os.environ.get("BINARYNET_DATA")
    if root:
        return Path(root).expanduser() / name
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "binarynet" / name


def _open_data(path):
    """Open ``path`` for reading, through gzip when its name ends in .gz."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _checksum_problem(path, remote):
    """Hash ``path`` in chunks; return None when it matches, else a short reason."""
    h = hashlib.new(remote.algo)
    try:
        with (_open_data(path) if remote.gunzip else open(path, "rb")) as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error) as e:
        return f"cannot be read ({e})"
    if h.hexdigest() == remote.digest:
        return None
    what = "decompressed bytes have" if remote.gunzip else "has"
    return f"{what} {remote.algo} {h.hexdigest()}, expected {remote.digest}"


def _find(folder, remote):
    """The first of the file's accepted local names that exists in ``folder``."""
    for name in remote.local_names():
        if (folder / name).is_file():
            return folder / name
    return None


def _fetch(dataset, remote, data_dir, download):
    """Return the path of a verified copy of ``remote`` (see the module docstring)."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        path = _find(folder, remote)
        if path is None:
            raise DataError(f"{folder / remote.name} is missing: get it from {remote.urls[0]}, "
                            f"or omit --data-dir to download it into the cache")
        problem = _checksum_problem(path, remote)
        if problem:
            warnings.warn(f"{path}: {problem}; using it anyway", stacklevel=3)
        return path
    folder = cache_dir(dataset)
    path = _find(folder, remote)
    if path is not None:
        problem = _checksum_problem(path, remote)
        if problem:
            raise DataError(f"{path} in the cache {problem}; delete it and run again "
                            f"to download a fresh copy")
        return path
    if not download:
        raise DataError(f"{folder / remote.name} is missing and downloading is off: get it "
                        f"from {remote.urls[0]} into {folder}, or pass --data-dir")
    return _download(remote, folder)


def _download(remote, folder):
    """Download ``remote`` into ``folder``, trying its URLs in order.

    The bytes go to a hidden temporary file in the same folder, which is renamed
    into place only once its checksum matches, so an interrupted or corrupt
    download never leaves a file under the real name.
    """
    failures = []
    for url in remote.urls:
        tmp = _temporary_file(folder, remote.name)
        try:
            with open(tmp, "wb") as out:
                _copy_url(url, out, remote.name)
            problem = _checksum_problem(tmp, remote)
            if problem is None:
                os.replace(tmp, folder / remote.name)
                return folder / remote.name
            failures.append(f"{url}: the download {problem}")
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DataError(f"could not download {remote.name} ({'; '.join(failures)}); "
                    f"download it by hand into {folder} or pass --data-dir")


def _temporary_file(folder, name):
    """Create ``folder`` if needed and a hidden file in it for a download in progress.

    The file name ends in ``name``, so that ".gz" still means gzip.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=f"-{name}")
    except OSError as e:
        raise DataError(f"cannot write into the cache folder {folder} ({e.strerror or e}); "
                        f"set BINARYNET_DATA to a writable folder or pass --data-dir") from e
    os.close(fd)
    return tmp


def _copy_url(url, out, label):
    """Stream ``url`` into the open file ``out``, with a progress bar for big files."""
    from tqdm import tqdm  # only needed when downloading

    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=label,
                  disable=total is not None and total < 10 * _CHUNK) as bar:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and out.tell() != total:
        raise ValueError(f"got {out.tell()} of {total} bytes")


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------

_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                  "http://yann.lecun.com/exdb/mnist/")


def _mnist_remote(name, sha256):
    return _Remote(name, tuple(m + name for m in _MNIST_MIRRORS), "sha256", sha256, gunzip=True)


# sha256 of the decompressed IDX files (as the shared data folder's README lists them).
_MNIST = {
    "train_images": _mnist_remote("train-images-idx3-ubyte.gz",
                                  "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": _mnist_remote("train-labels-idx1-ubyte.gz",
                                  "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": _mnist_remote("t10k-images-idx3-ubyte.gz",
                                 "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": _mnist_remote("t10k-labels-idx1-ubyte.gz",
                                 "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


def _read_idx(path, ndim, tail):
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions.

    Header: a big-endian magic 0x0000080N (0x08 = unsigned byte, N = ndim),
    then N big-endian uint32 sizes.  ``tail`` is the expected shape after the
    first (count) dimension.  Returns a writable uint8 array.
    """
    try:
        with _open_data(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is corrupt ({e}); delete it and download it again") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (only {len(raw)} bytes); delete it and download it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise DataError(f"{path} has magic number {magic:#010x}, expected {0x800 + ndim:#010x}: "
                        f"not an MNIST IDX file of this kind")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != tail:
        raise DataError(f"{path} holds items of shape {dims[1:]}, expected {tail}")
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path} has {len(raw)} bytes, its header says {header + int(np.prod(dims))}: "
                        f"truncated or padded; delete it and download it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _mnist_pair(images_path, labels_path):
    """Images as N x 1 x 28 x 28 and labels as int64, checked against each other."""
    X = _read_idx(images_path, 3, (28, 28))
    y = _read_idx(labels_path, 1, ()).astype(np.int64)
    if len(X) != len(y):
        raise DataError(f"{images_path} has {len(X)} images but {labels_path} has {len(y)} labels")
    if y.size and y.max() > 9:
        raise DataError(f"{labels_path} has label {y.max()}, expected 0..9")
    return X.reshape(-1, 1, 28, 28), y


def load_mnist(data_dir=None, download=True):
    """MNIST split as the reference mnist.py split it through pylearn2's MNIST:
    train = first 50,000 of the training file (start=0, stop=50000),
    valid = the last 10,000 (start=50000, stop=60000), test = the 10,000 test file.
    """
    paths = {k: _fetch("mnist", r, data_dir, download) for k, r in _MNIST.items()}
    X, y = _mnist_pair(paths["train_images"], paths["train_labels"])
    X_test, y_test = _mnist_pair(paths["test_images"], paths["test_labels"])
    n_valid = 10000
    if len(X) <= n_valid:
        raise DataError(f"{paths['train_images']} has only {len(X)} images; the split needs more than {n_valid}")
    return {"train": (X[:-n_valid], y[:-n_valid]),
            "valid": (X[-n_valid:], y[-n_valid:]),
            "test": (X_test, y_test)}


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-py"
# md5 values as published with the data set and listed by torchvision's CIFAR10.
_CIFAR_ARCHIVE = _Remote("cifar-10-python.tar.gz", (_CIFAR_URL,), "md5",
                         "c58f30108f718f92721af3b95e74349a")
_CIFAR_BATCHES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else.

    A batch from a user's folder is used even when its checksum differs, so it
    must not be able to run code the way an arbitrary pickle can.
    """

    _allowed = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    })

    def find_class(self, module, name):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(f, where):
    """Images N x 3 x 32 x 32 and int64 labels from one pickled batch.

    A batch is a dict with b'data', uint8 N x 3072 holding each image's red,
    green and blue 32 x 32 planes in turn (row-major), and b'labels', a list of
    N ints.  ``where`` names the file (or archive member) in errors.
    """
    try:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, zlib.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{where} is not a readable CIFAR-10 batch ({e}); delete it and download it again") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where} lacks the b'data' and b'labels' entries of a CIFAR-10 batch")
    X, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(X, np.ndarray) or X.dtype != np.uint8 or X.ndim != 2 or X.shape[1] != 3072:
        raise DataError(f"{where}: b'data' should be a uint8 N x 3072 array, "
                        f"got {getattr(X, 'dtype', type(X).__name__)} {getattr(X, 'shape', '')}")
    labels = labels.tolist() if isinstance(labels, np.ndarray) else labels
    if (not isinstance(labels, (list, tuple)) or len(labels) != len(X)
            or not all(type(v) is int and 0 <= v <= 9 for v in labels)):
        raise DataError(f"{where}: b'labels' should be a list of {len(X)} ints in 0..9, one per image")
    return X.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


def _cifar_from_archive(path):
    """All six batches from the .tar.gz, read in one pass over the stream."""
    batches = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                folder, _, name = member.name.removeprefix("./").partition("/")
                if folder == _CIFAR_FOLDER and name in _CIFAR_BATCHES and member.isfile():
                    batches[name] = _read_cifar_batch(tar.extractfile(member), f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .tar.gz ({e}); delete it and download it again") from e
    missing = [n for n in _CIFAR_BATCHES if n not in batches]
    if missing:
        raise DataError(f"{path} lacks {_CIFAR_FOLDER}/{missing[0]}: not the CIFAR-10 python archive")
    return batches


def _cifar_from_folder(data_dir):
    """All six batches from an extracted ``cifar-10-batches-py/``, each verified."""
    batches = {}
    for name, md5 in _CIFAR_BATCHES.items():
        remote = _Remote(f"{_CIFAR_FOLDER}/{name}", (_CIFAR_URL,), "md5", md5)
        path = _fetch("cifar10", remote, data_dir, download=False)
        with open(path, "rb") as f:
            batches[name] = _read_cifar_batch(f, path)
    return batches


def load_cifar10(data_dir=None, download=True):
    """CIFAR-10 split as the reference cifar10.py split it through pylearn2's
    CIFAR10: data_batch_1..5 concatenated in order, train = the first 45,000
    (start=0, stop=45000), valid = the last 5,000, test = test_batch.

    Reads ``cifar-10-python.tar.gz`` directly, or an extracted
    ``cifar-10-batches-py/`` folder when the archive is absent.  Batches may hold
    any number of images (the valid set is always the last 5,000).
    """
    folder = Path(data_dir).expanduser() if data_dir is not None else cache_dir("cifar10")
    if (folder / _CIFAR_FOLDER).is_dir() and _find(folder, _CIFAR_ARCHIVE) is None:
        batches = _cifar_from_folder(data_dir)
    else:
        batches = _cifar_from_archive(_fetch("cifar10", _CIFAR_ARCHIVE, data_dir, download))
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    X = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    n_valid = 5000
    if len(X) <= n_valid:
        raise DataError(f"the CIFAR-10 training batches in {folder} hold only {len(X)} images; "
                        f"the split needs more than {n_valid}")
    X_test, y_test = batches["test_batch"]
    return {"train": (X[:-n_valid], y[:-n_valid]),
            "valid": (X[-n_valid:], y[-n_valid:]),
            "test": (X_test, y_test)}


# ---------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------

_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# md5 values listed by torchvision's SVHN for the files on the site above.
_SVHN = {
    "train": _Remote("train_32x32.mat", (_SVHN_URL + "train_32x32.mat",), "md5",
                     "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "extra": _Remote("extra_32x32.mat", (_SVHN_URL + "extra_32x32.mat",), "md5",
                     "a93ce644f1a588dc4d68dda5feec44a7"),
    "test": _Remote("test_32x32.mat", (_SVHN_URL + "test_32x32.mat",), "md5",
                    "eb5a983be6a315427106f1b164d9cef3"),
}


def _read_svhn_mat(path):
    """X as stored (32 x 32 x 3 x N uint8, no copy) and labels 1..10 as int64."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except MemoryError:
        raise
    except Exception as e:  # scipy reports bad files through many exception types
        raise DataError(f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}); "
                        f"delete it and download it again") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} lacks the variables X and y of an SVHN cropped-digits file")
    X, y = mat["X"], mat["y"]
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X should be uint8 32 x 32 x 3 x N, got {X.dtype} {X.shape}")
    if y.size != X.shape[3] or y.ndim > 2 or (y.ndim == 2 and 1 not in y.shape):
        raise DataError(f"{path}: y should be N x 1 with N = {X.shape[3]}, got {y.shape}")
    y = y.reshape(-1)
    if y.size and (y.min() < 1 or y.max() > 10 or not np.all(y == np.round(y))):
        raise DataError(f"{path}: y should hold labels 1..10 (10 = digit 0)")
    return X, y.astype(np.int64)


def _pick_valid(y, per_class, rng, path):
    """Boolean mask of the validation images of one file, as pylearn2 picks them.

    pylearn2/datasets/svhn.py, SVHN.make_data's split_train_valid: for each
    label 1..10 in turn, shuffle that label's indices (in file order) with a
    RandomState seeded 322 and keep the first ``per_class``; the same rng goes
    on from train_32x32.mat (400 per class) to extra_32x32.mat (200 per class).
    numpy keeps RandomState's stream frozen, so this picks the same images.
    """
    mask = np.zeros(len(y), dtype=bool)
    for label in range(1, 11):
        index = np.flatnonzero(y == label)
        if len(index) < per_class:
            raise DataError(f"{path} has {len(index)} images of label {label}, "
                            f"the validation split needs {per_class}")
        rng.shuffle(index)
        mask[index[:per_class]] = True
    return mask


def _gather(sources, chunk=4096):
    """Stack the images ``X[..., keep]`` of each ``(X, keep)`` into one N x 3 x 32 x 32 array.

    X is the .mat layout (row, column, channel, image).  Copying a few thousand
    images at a time keeps the temporaries small (np.take would first make a
    contiguous copy of the whole of X).
    """
    out = np.empty((sum(int(keep.sum()) for _, keep in sources), 3, 32, 32), np.uint8)
    start = 0
    for X, keep in sources:
        index = np.flatnonzero(keep)
        for i in range(0, len(index), chunk):
            part = index[i:i + chunk]
            out[start:start + len(part)] = X[:, :, :, part].transpose(3, 2, 0, 1)
            start += len(part)
    return out


def load_svhn(data_dir=None, download=True):
    """SVHN split as the reference svhn.py got it from pylearn2's SVHN
    ('splitted_train', 'valid', 'test'):

    valid = 400 images per class from train_32x32.mat and 200 per class from
    extra_32x32.mat (6,000, chosen as in ``_pick_valid``); train = all other
    images of train then extra, in file order (598,388 with the real files);
    test = test_32x32.mat (26,032).  Label 10 means digit 0 and becomes class 0
    (pylearn2 stored label - 1 instead; a renaming of classes that changes no
    result).  The order within train and valid is file order: pylearn2
    shuffled them, and the training loop shuffles anyway.
    """
    paths = {k: _fetch("svhn", r, data_dir, download) for k, r in _SVHN.items()}
    rng = np.random.RandomState(322)
    X_tr, y_tr = _read_svhn_mat(paths["train"])
    valid_tr = _pick_valid(y_tr, 400, rng, paths["train"])
    X_ex, y_ex = _read_svhn_mat(paths["extra"])
    valid_ex = _pick_valid(y_ex, 200, rng, paths["extra"])

    X_train = _gather([(X_tr, ~valid_tr), (X_ex, ~valid_ex)])
    X_valid = _gather([(X_tr, valid_tr), (X_ex, valid_ex)])
    y_train = np.concatenate([y_tr[~valid_tr], y_ex[~valid_ex]]) % 10
    y_valid = np.concatenate([y_tr[valid_tr], y_ex[valid_ex]]) % 10
    del X_tr, X_ex  # free the .mat arrays before reading test
    return {"train": (X_train, y_train), "valid": (X_valid, y_valid), "test": _read_svhn_test(paths["test"])}


def load_svhn_test(data_dir=None, download=True):
    """SVHN's test split alone, as load_svhn gives it: what 1-bit inference needs,
    without reading train and extra (about 2 GB)."""
    return {"test": _read_svhn_test(_fetch("svhn", _SVHN["test"], data_dir, download))}


def _read_svhn_test(path):
    """test_32x32.mat (26,032 images) in file order, labels 10 -> 0."""
    X_te, y_te = _read_svhn_mat(path)
    return _gather([(X_te, np.ones(len(y_te), dtype=bool))]), y_te % 10
