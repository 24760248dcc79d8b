"""The 1-bit MNIST network of the paper's "Run-time" section, and
`python binary_ops.py --infer`.

A trained BinaryNet MLP (mnist.py's .npz) runs twice on the test set: in float32,
on the training code's own modules, and on XNOR-popcount (binary_ops' ops), with
weights packed once and each hidden layer's bias, batch norm and sign folded into
one integer threshold per unit, so that activations pass packed to packed.  The
two must predict identically.

Reusable beyond the MLP: `BatchNorm` (inference-mode batch norm), `Layer`,
`read_npz` (reading a parameter file, with its checks and the running_var
conversion), `fold_threshold` and `compare`.  The command recognises the network
in the file: the CIFAR-10 and SVHN ConvNets run through convnet.py and
infer_convnet.py.
"""
import json
import sys
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import binary_net
from bench import time_ms
from binary_ops import (PIXEL_BITS, UsageError, baseline_matmul, bit_planes, pack, pack_weights,
                        xnor_fire_op, xnor_gemm_op)

BN_EPS = binary_net.BN_EPSILON   # the reference's batch-norm epsilon
sign = binary_net.sign           # sign(0) = +1: the convention of both halves of the project


# ---------------------------------------------------------------------------
# The MNIST network's parameters, as mnist.py saves them.
# ---------------------------------------------------------------------------

class ParameterError(UsageError):
    """A parameter file that cannot be used; the message is one line."""


@dataclass
class BatchNorm:
    """Batch norm in inference mode, float32, as binary_net.BatchNorm evaluates it
    (Lasagne's BatchNormLayer): (x - mean) * (gamma * inv_std) + beta."""
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # binary_net.BatchNorm's evaluation, operation for operation (a test
        # checks them bit for bit): the float path runs that module and the
        # threshold folding this, so the 1-bit path decides every
        # rounding-level tie as the float path does.
        return (x - self.mean) * (self.gamma * self.inv_std) + self.beta

    def to(self, device):
        return BatchNorm(*(t.to(device) for t in (self.gamma, self.beta, self.mean, self.inv_std)))


@dataclass
class Layer:
    """A dense layer (real-valued latent weights, out x in) and its batch norm."""
    weight: torch.Tensor
    bias: torch.Tensor
    bn: BatchNorm

    def to(self, device):
        return Layer(self.weight.to(device), self.bias.to(device), self.bn.to(device))


N_LAYERS = 4
N_INPUTS = 28 * 28
BN_KEYS = {"weight": "gamma", "bias": "beta", "running_mean": "mean", "running_inv_std": "inv_std"}


def convert_running_var(arrays: dict, path) -> dict:
    """Files saved before batch norm kept Lasagne's statistics hold bnN.running_var
    (PyTorch's average of the unbiased variance) instead of bnN.running_inv_std.
    Such a model was evaluated with 1 / sqrt(running_var + epsilon), which is the
    inv_std it needs now: convert, and say so once."""
    old = sorted(k for k in arrays if k.endswith(".running_var"))
    if not old:
        return arrays
    print(f"binary_ops: note: {path} was saved with PyTorch's running_var (before batch norm kept "
          f"Lasagne's running_inv_std); converted as inv_std = 1 / sqrt(var + {BN_EPS:g})", file=sys.stderr)
    arrays = dict(arrays)
    for key in old:
        var = arrays.pop(key).astype(np.float64)
        arrays[key.replace(".running_var", ".running_inv_std")] = (1 / np.sqrt(var + BN_EPS)).astype(np.float32)
    return arrays


def read_npz(path) -> dict:
    """The arrays of a parameter file that mnist.py, cifar10.py or svhn.py saved
    (a model's state_dict), with old files' running_var converted."""
    if not Path(path).is_file():
        raise ParameterError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ParameterError(f"{path} is not a .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ParameterError(f"cannot read {path}: {e}") from None
    arrays = {k: v for k, v in arrays.items() if not k.endswith("num_batches_tracked")}
    return convert_running_var(arrays, path)


def load_parameters(path) -> list[Layer]:
    """Read the .npz of mnist.py: the state_dict of dense1..4 and bn1..4."""
    return mlp_from_arrays(read_npz(path), path)


def read_layer(arrays: dict, path, name: str, bn: int, shape: tuple):
    """(weight, bias, BatchNorm) of layer `name` and its batch norm bn<bn>, float32,
    shapes and types checked with one-line errors.  `shape` is the weight's, its first
    dimension (the units) None where any count will do."""
    weight = arrays[f"{name}.weight"]
    if weight.ndim != len(shape) or any(want not in (None, got) for want, got in zip(shape, weight.shape)):
        expected = "(" + ", ".join("units" if d is None else str(d) for d in shape) + ")"
        raise ParameterError(f"{path}: {name}.weight has shape {weight.shape}, expected {expected}")
    n_out, vectors = weight.shape[0], {}
    for key in [f"{name}.bias"] + [f"bn{bn}.{p}" for p in BN_KEYS]:
        if arrays[key].shape != (n_out,):
            raise ParameterError(f"{path}: {key} has shape {arrays[key].shape}, expected ({n_out},)")
        vectors[key] = arrays[key]
    for key, value in [(f"{name}.weight", weight), *vectors.items()]:
        if not np.issubdtype(value.dtype, np.floating):
            raise ParameterError(f"{path}: {key} has dtype {value.dtype}, expected a float type")
    t = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in vectors.items()}
    bn_ = BatchNorm(**{field: t[f"bn{bn}.{p}"] for p, field in BN_KEYS.items()})
    return torch.as_tensor(weight, dtype=torch.float32), t[f"{name}.bias"], bn_


def mlp_from_arrays(arrays: dict, path) -> list[Layer]:
    """The MLP's layers from its state_dict arrays, shapes and types checked."""
    expected = {f"dense{i}.{p}" for i in range(1, N_LAYERS + 1) for p in ("weight", "bias")}
    expected |= {f"bn{i}.{p}" for i in range(1, N_LAYERS + 1) for p in BN_KEYS}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ParameterError(f"{path} has the wrong keys (missing: {', '.join(missing) or 'none'}; "
                             f"unexpected: {', '.join(extra) or 'none'})")
    layers, n_in = [], N_INPUTS
    for i in range(1, N_LAYERS + 1):
        layers.append(Layer(*read_layer(arrays, path, f"dense{i}", i, (None, n_in))))
        n_in = layers[-1].weight.shape[0]
    return layers


PIXEL_SCALE = 255       # input x = (2 p - 255) / PIXEL_SCALE, i.e. 2 p / 255 - 1


def centered_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (N x ...) as float32 rows of 2 p - 255: the network's
    input x = 2 p / 255 - 1 times PIXEL_SCALE, in exact integers."""
    return 2 * pixels.reshape(len(pixels), -1).float() - PIXEL_SCALE


# ---------------------------------------------------------------------------
# The float32 network: the reference the 1-bit network must agree with.
# ---------------------------------------------------------------------------

def state_dict(layers: list[Layer]) -> dict:
    """The parameters under the training model's names (dense1.weight, bn1.running_inv_std, ...)."""
    state = {}
    for i, layer in enumerate(layers, 1):
        state |= {f"dense{i}.weight": layer.weight, f"dense{i}.bias": layer.bias}
        state |= {f"bn{i}.{key}": getattr(layer.bn, name) for key, name in BN_KEYS.items()}
    return state


def float_model(layers: list[Layer]) -> nn.Sequential:
    """The MLP on the training code's own modules, named as mnist.build_model names
    them (dense1, bn1, act1, ...; binary_net's DenseLayer, BatchNorm, BinaryTanh),
    with these parameters loaded by load_state_dict, in eval mode.  Not
    mnist.build_model itself: that one gives every hidden layer one width, and
    the tests check networks of other shapes; in eval mode its dropouts do nothing."""
    modules = []
    for i, layer in enumerate(layers, 1):
        n_out, n_in = layer.weight.shape
        modules += [(f"dense{i}", binary_net.DenseLayer(n_in, n_out)), (f"bn{i}", binary_net.BatchNorm(n_out))]
        if i < len(layers):
            modules.append((f"act{i}", binary_net.BinaryTanh()))
    model = nn.Sequential(OrderedDict(modules)).to(layers[0].weight.device)
    model.load_state_dict(state_dict(layers))
    return model.eval().requires_grad_(False)


class FloatMLP:
    """The BinaryNet MLP in eval mode, in float32, on the training code's modules
    (float_model): binary weights sign(W), dense -> batch norm -> sign for the
    hidden layers, dense -> batch norm for the scores.

    The batch norms and the activations are the training modules themselves; the
    dense products are computed here, for three reasons.  The first layer computes
    x . sign(W) as ((2 p - 255) . sign(W)) / 255: the same value as from
    x = 2 p / 255 - 1, but the product is of small integers and so exact in
    float32 whatever the summation order of the GEMM, and the only rounding is
    the division's.  Every layer is then a deterministic function of integer
    accumulators, which is what lets the 1-bit network reproduce its predictions
    bit for bit (DenseLayer's forward on 2 p / 255 - 1 agrees on all but a rounding
    tie or two).  `matmul` swaps in another GEMM kernel (the baseline, on CUDA).
    And sign(W) is transposed once, not binarized again on every call, so
    that the float pass is timed on its products alone."""

    def __init__(self, layers: list[Layer], matmul=torch.mm):
        model = float_model(layers)
        self.stages = [(getattr(model, f"dense{i}"), getattr(model, f"bn{i}"), getattr(model, f"act{i}", None))
                       for i in range(1, len(layers) + 1)]
        self.weights_t = [dense.binary_weight().T.contiguous() for dense, _, _ in self.stages]
        self.matmul = matmul

    def hidden(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's output before its sign (or the scores, for the last);
        x is centered_pixels for i = 0 and +-1 activations after."""
        dense, bn, _ = self.stages[i]
        product = self.matmul(x, self.weights_t[i])
        if i == 0:
            product = product / PIXEL_SCALE
        return bn(product + dense.bias)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = centered_pixels(pixels)
        for i, (_, _, activation) in enumerate(self.stages[:-1]):
            x = activation(self.hidden(i, x))
        return self.hidden(len(self.stages) - 1, x)


# ---------------------------------------------------------------------------
# The 1-bit network.
# ---------------------------------------------------------------------------

def fold_threshold(layer: Layer, dense_output, bound: int):
    """Fold a hidden layer's bias, batch norm and sign into one integer
    threshold per unit (the "Run-time" section: only the XNOR-popcount
    accumulator d is left, compared with a constant).

    dense_output(d) maps integer accumulators to the float32 dense output
    (before the bias) that the float path sees; d ranges over [-bound, bound].
    Every float32 operation of the float path is monotone in d, so
    sign(BN(dense_output(d) + bias)) is a step function of d: it rises with d
    where gamma >= 0 and falls where gamma < 0.  Returns (direction, t),
    int64 per unit: the unit outputs +1 exactly when direction * d >= t.
    t is found by bisection on the float path's own arithmetic, so ties
    (BN output exactly 0, sign(0) = +1), gamma == 0 (a constant unit: t is
    -bound or bound + 1) and rounding are decided as the float path decides them.
    """
    direction = torch.where(layer.bn.gamma >= 0, 1, -1).to(torch.int64)

    def fires(e):  # nondecreasing in e = direction * d
        return layer.bn(dense_output(direction * e) + layer.bias) >= 0

    low = torch.full_like(direction, -bound)
    high = torch.full_like(direction, bound + 1)   # bound + 1: never fires
    while bool((searching := low < high).any()):
        mid = torch.div(low + high, 2, rounding_mode="floor")
        up = fires(mid)
        high = torch.where(searching & up, mid, high)
        low = torch.where(searching & ~up, mid + 1, low)
    return direction, low


@dataclass
class BinaryDense:
    """A dense layer of the 1-bit network: packed sign(W) rows (negated for
    units whose batch norm has gamma < 0), the layer's fan-in k, how many
    rows of the input make one input vector (8 bit planes for the first
    layer, else 1) and, for the hidden layers, each unit's threshold.  The
    words are held as packed weights (pack_weights), laid out once for a
    vertical kernel at the first product that runs one."""
    words: torch.Tensor
    k: int
    planes: int = 1
    threshold: torch.Tensor | None = None

    def __post_init__(self):
        self.weights = pack_weights(self.words, self.k)
        self.words = self.weights.words

    def accumulate(self, x_words: torch.Tensor) -> torch.Tensor:
        """The integer accumulators (XNOR dot products), M x N int32."""
        return xnor_gemm_op(x_words, self.words, self.k, self.planes,
                            self.weights.layout_for(x_words, self.planes))

    def fire(self, x_words: torch.Tensor) -> torch.Tensor:
        """The packed activations sign(BN(.)): +1 where the accumulator reaches
        the unit's threshold, computed by the kernel without an int32 matrix."""
        return xnor_fire_op(x_words, self.words, self.k, self.planes, self.threshold, None,
                            self.weights.layout_for(x_words, self.planes))


def binary_dense(layer: Layer, dense_output, bound: int, planes: int) -> BinaryDense:
    direction, threshold = fold_threshold(layer, dense_output, bound)
    rows = sign(layer.weight) * direction[:, None]
    return BinaryDense(pack(rows), layer.weight.shape[1], planes, threshold.to(torch.int32))


class XnorMLP:
    """The same network on XNOR and popcount: weights packed once, hidden
    activations passed packed to packed.

    First layer: the input is 8-bit, not binary.  As in the paper it is
    computed over the pixels' bit planes: with each plane x^n read as the
    +-1 vector 2 x^n - 1 and d_n its XNOR dot product with sign(W),
        D = sum_n 2^n d_n = sum_k (2 p_k - 255) sign(W_k) = 255 * (x . sign(W))
    for the input x = 2 p / 255 - 1, so the pixel scaling is an exact
    factor 255 that the threshold absorbs (D / 255 rounded to float32 is the
    float path's first dense output)."""

    def __init__(self, layers: list[Layer]):
        first, *hidden, last = layers
        k = first.weight.shape[1]
        self.first = binary_dense(first, lambda d: d.float() / PIXEL_SCALE,
                                  (2 ** PIXEL_BITS - 1) * k, PIXEL_BITS)
        self.hidden = [binary_dense(layer, lambda d: d.float(), layer.weight.shape[1], 1)
                       for layer in hidden]
        self.last = BinaryDense(pack(sign(last.weight)), last.weight.shape[1])
        self.last_bias, self.last_bn = last.bias, last.bn

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.first.fire(bit_planes(pixels.reshape(len(pixels), -1)))
        for layer in self.hidden:
            h = layer.fire(h)
        # The output layer's batch norm stays in float for the 10 scores.
        return self.last_bn(self.last.accumulate(h).float() + self.last_bias)

    def size_bytes(self) -> int:
        """Packed weights, one int32 threshold per hidden unit, and the output
        layer's bias and batch norm in float32."""
        packed = sum(layer.words.numel() * 8 for layer in [self.first, *self.hidden, self.last])
        thresholds = sum(layer.threshold.numel() * 4 for layer in [self.first, *self.hidden])
        return packed + thresholds + 5 * self.last_bias.numel() * 4


def float_size_bytes(layers: list) -> int:
    """The parameters at 32 bits: weights, biases and batch norms (MLP or ConvNet layers)."""
    return sum(4 * t.numel() for layer in layers
               for t in (layer.weight, layer.bias, layer.bn.gamma, layer.bn.beta,
                         layer.bn.mean, layer.bn.inv_std))


# ---------------------------------------------------------------------------
# --infer: the paper's 1-bit MNIST inference.
# ---------------------------------------------------------------------------

def error_rate(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Test error in percent, as mnist.py reports it."""
    return 100.0 * (scores.argmax(1).cpu() != labels).float().mean().item()


WARM_UP = 100       # images run once before timing
INFER_REPEATS = 3   # timed passes over the test set, median taken


def compare(float_net, xnor_net, pixels: torch.Tensor, labels: torch.Tensor, device: str,
            interleave: bool = False) -> dict:
    """Run both networks on the test set; their errors, whether they predict
    identically, and their times (median of INFER_REPEATS passes).  With
    `interleave`, the timed passes alternate (float, 1-bit, float, ...): for
    passes of seconds, so that a burst of others' work on a shared machine
    falls on both networks and their ratio stays fair."""
    float_net(pixels[:WARM_UP])   # thread pools, kernel compilation
    xnor_net(pixels[:WARM_UP])
    nets = {"float": lambda: float_net(pixels), "xnor": lambda: xnor_net(pixels)}
    # each network's first full pass gives its scores and warms it up (see time_ms)
    if interleave:
        scores = {name: net() for name, net in nets.items()}
        ms = time_ms(nets, device, 1, rounds=INFER_REPEATS, warm_up=False)
    else:
        scores, ms = {}, {}
        for name, net in nets.items():
            scores[name] = net()
            ms |= time_ms({name: net}, device, INFER_REPEATS, warm_up=False)
    return dict(float_err=error_rate(scores["float"], labels), xnor_err=error_rate(scores["xnor"], labels),
                identical=bool(torch.equal(scores["float"].argmax(1), scores["xnor"].argmax(1))),
                float_ms=ms["float"], xnor_ms=ms["xnor"])


def infer(layers: list[Layer], pixels: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
    """Run both MLPs on the test set on one device; compare and time them."""
    layers = [layer.to(device) for layer in layers]
    pixels = pixels.to(device)
    float_net, xnor_net = FloatMLP(layers), XnorMLP(layers)
    result = compare(float_net, xnor_net, pixels, labels, device)
    result.update(bytes_32bit=float_size_bytes(layers), bytes_1bit=xnor_net.size_bytes())
    if device == "cuda":
        baseline_net = FloatMLP(layers, matmul=baseline_matmul)
        baseline_net(pixels[:WARM_UP])
        result["baseline_ms"] = time_ms({"baseline": lambda: baseline_net(pixels)},
                                        device, INFER_REPEATS, warm_up=False)["baseline"]
    return result


def print_infer(result: dict, device: str, network: str) -> None:
    print(f"{network}, {device}" + (f", {torch.get_num_threads()} threads" if device == "cpu" else ""))
    print(f"  float32 forward: test error {result['float_err']:.2f}%, {result['float_ms']:.1f} ms")
    print(f"  1-bit XNOR:      test error {result['xnor_err']:.2f}%, {result['xnor_ms']:.1f} ms "
          f"({result['float_ms'] / result['xnor_ms']:.1f}x faster)")
    if "baseline_ms" in result:
        print(f"  baseline kernel: {result['baseline_ms']:.1f} ms "
              f"(XNOR {result['baseline_ms'] / result['xnor_ms']:.1f}x faster)")
    print(f"  predictions identical: {'yes' if result['identical'] else 'NO'}")
    print(f"  model size: {result['bytes_32bit'] / 2**20:.2f} MiB at 32 bits, "
          f"{result['bytes_1bit'] / 2**20:.2f} MiB at 1 bit "
          f"({result['bytes_32bit'] / result['bytes_1bit']:.1f}x smaller)")


TITLES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "svhn": "SVHN"}


def load_test_set(dataset: str, data_dir, limit=None):
    """The first `limit` test images (all by default) and labels of a data set
    through datasets.py, as torch tensors (uint8 images: N x 784 for MNIST,
    N x 3 x 32 x 32 for the others); without a data folder, datasets' own
    cache (downloading if needed)."""
    import datasets
    load = {"mnist": datasets.load_mnist, "cifar10": datasets.load_cifar10, "svhn": datasets.load_svhn_test}[dataset]
    try:
        X, y = load(data_dir, download=data_dir is None)["test"]
    except datasets.DataError as e:
        raise ParameterError(str(e)) from None
    X, y = torch.as_tensor(X[:limit]), torch.as_tensor(y[:limit])
    return (X.reshape(len(X), -1) if dataset == "mnist" else X), y


def recognise(arrays: dict, path, dataset=None):
    """The network a parameter file holds, from its keys: conv1.. (cifar10.py's
    or svhn.py's ConvNet, told apart by their filter counts) or dense1.. alone
    (mnist.py's MLP); `dataset` overrides the filter counts.  Returns
    (dataset, network: list[Layer] or convnet.ConvNet)."""
    import convnet
    if any(key.startswith("conv") for key in arrays):
        if dataset == "mnist":
            raise ParameterError(f"{path} holds a ConvNet, not mnist.py's MLP")
        net = convnet.convnet_from_arrays(arrays, path)
        filters = convnet.filters(net)
        dataset = dataset or convnet.DATASETS.get(filters)
        if dataset is None:
            raise ParameterError(f"{path} holds a ConvNet of filters {filters}, neither cifar10.py's nor "
                                 f"svhn.py's: name its test set with --dataset")
        return dataset, net
    if not any(key.startswith("dense") for key in arrays):
        raise ParameterError(f"{path} holds no network of this project (no conv or dense weights)")
    if dataset not in (None, "mnist"):
        raise ParameterError(f"{path} holds mnist.py's MLP, not a ConvNet for {dataset}")
    return "mnist", mlp_from_arrays(arrays, path)


def run_infer(npz_path, data_dir, json_path, devices, limit=None, dataset=None) -> int:
    """--infer: the network in an .npz at 32 bits and at 1 bit on its test set."""
    import convnet
    import infer_convnet
    dataset, network = recognise(read_npz(npz_path), npz_path, dataset)
    pixels, labels = load_test_set(dataset, data_dir, limit)
    results = {}
    for device in devices:
        if dataset == "mnist":
            results[device] = infer(network, pixels, labels, device)
            title = f"MNIST test set: {len(pixels)} images, {network[0].weight.shape[0]} hidden units"
        else:
            results[device] = infer_convnet.infer(network, pixels, labels, device)
            title = (f"{TITLES[dataset]} test set: {len(pixels)} images, filters "
                     f"{'-'.join(map(str, convnet.filters(network)))}, "
                     f"{network.dense[0].weight.shape[0]} hidden units")
        print_infer(results[device], device, title)
    if json_path:
        out = dict(results[devices[0]], dataset=dataset, images=len(pixels))
        if len(devices) > 1:
            out["cuda"] = results["cuda"]
        Path(json_path).write_text(json.dumps(out, indent=1))
    return 0
