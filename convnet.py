"""BinaryNet's ConvNets (the CIFAR-10 and SVHN networks of Courbariaux et al.
2016, cifar10.build_model) for inference: their parameters as cifar10.py and
svhn.py save them, and the float32 network in evaluation mode, with exact
integer accumulators: the reference that the 1-bit network (infer_convnet.py)
reproduces prediction for prediction.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import binary_net
from infer import BN_KEYS, PIXEL_SCALE, Layer, ParameterError, float_size_bytes, read_layer

BATCH = 50          # images per pass of both networks: see docs/results.md


@dataclass
class ConvLayer:
    """A 3x3 convolution padded by 1 (real-valued latent weights, O x C x 3 x 3),
    its bias, whether a 2x2 max-pool follows, and its batch norm."""
    weight: torch.Tensor
    bias: torch.Tensor
    bn: object
    pool: bool

    def to(self, device):
        return ConvLayer(self.weight.to(device), self.bias.to(device), self.bn.to(device), self.pool)


@dataclass
class ConvNet:
    """The paper's ConvNet: convolutions, then dense layers (the last one scores)."""
    convs: list
    dense: list

    def to(self, device):
        return ConvNet([c.to(device) for c in self.convs], [d.to(device) for d in self.dense])

    def float_bytes(self) -> int:
        return float_size_bytes(self.convs + self.dense)


def centered_images(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images N x 3 x H x W as float32 2 p - 255: the input 2 p / 255 - 1
    times PIXEL_SCALE, in exact integers."""
    return 2 * pixels.float() - PIXEL_SCALE


# ---------------------------------------------------------------------------
# The float32 network: the trained network in evaluation mode.
# ---------------------------------------------------------------------------

def state_dict(net: ConvNet) -> dict:
    """The parameters under the training model's names (conv1.weight, bn1.running_inv_std, ...)."""
    state, n = {}, len(net.convs)
    for name, layers in (("conv", net.convs), ("dense", net.dense)):
        for i, layer in enumerate(layers, 1):
            bn = i if name == "conv" else n + i
            state |= {f"{name}{i}.weight": layer.weight, f"{name}{i}.bias": layer.bias}
            state |= {f"bn{bn}.{key}": getattr(layer.bn, field) for key, field in BN_KEYS.items()}
    return state


def float_model(net: ConvNet) -> nn.Sequential:
    """The ConvNet on the training code's own modules, named as
    cifar10.build_model names them (conv1, pool1, bn1, act1, ..., dense1, bn7, ...),
    with these parameters loaded by load_state_dict, in eval mode.  Not
    build_model itself: that one fixes 32 x 32 images, and the tests run others."""
    modules, n_in = [], 0
    for i, layer in enumerate(net.convs, 1):
        c_out, c_in = layer.weight.shape[:2]
        modules.append((f"conv{i}", binary_net.Conv2DLayer(c_in, c_out)))
        if layer.pool:
            modules.append((f"pool{i // 2}", nn.MaxPool2d(2)))
        modules += [(f"bn{i}", binary_net.BatchNorm(c_out)), (f"act{i}", binary_net.BinaryTanh())]
    for j, layer in enumerate(net.dense, 1):
        n_out, n_in = layer.weight.shape
        modules += [(f"dense{j}", binary_net.DenseLayer(n_in, n_out)),
                    (f"bn{len(net.convs) + j}", binary_net.BatchNorm(n_out))]
        if j < len(net.dense):
            modules.append((f"act{len(net.convs) + j}", binary_net.BinaryTanh()))
    model = nn.Sequential(OrderedDict(modules)).to(net.convs[0].weight.device)
    model.load_state_dict(state_dict(net))
    return model.eval().requires_grad_(False)


class FloatConvNet:
    """The ConvNet in eval mode in float32, on the training code's modules
    (float_model) and torch's conv2d: binary weights sign(W); conv -> [max-pool]
    -> batch norm -> sign for the hidden layers, dense -> batch norm for the scores.

    As FloatMLP, the products are computed here so that every accumulator is
    an exact integer: the first layer convolves 2 p - 255 (not 2 p / 255 - 1)
    and divides by 255, later layers convolve +-1 activations, and the bias is
    added after the convolution.  On CUDA the conv output is rounded to the
    integer it is: cuDNN may pick Winograd or FFT algorithms, whose
    transforms round.  The weights are binarized once, so that the float pass
    is timed on its convolutions and products alone."""

    def __init__(self, net: ConvNet):
        model, n = float_model(net), len(net.convs)
        self.convs = [(getattr(model, f"conv{i}"), getattr(model, f"pool{i // 2}") if layer.pool else None,
                       getattr(model, f"bn{i}"), getattr(model, f"act{i}"))
                      for i, layer in enumerate(net.convs, 1)]
        self.dense_stages = [(getattr(model, f"dense{j}"), getattr(model, f"bn{n + j}"),
                              getattr(model, f"act{n + j}", None)) for j in range(1, len(net.dense) + 1)]
        self.conv_weights = [conv.binary_weight() for conv, _, _, _ in self.convs]
        self.dense_weights = [dense.binary_weight().T.contiguous() for dense, _, _ in self.dense_stages]

    def conv(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Conv layer i's output before its sign: x is centered_images for i = 0."""
        conv, pool, bn, _ = self.convs[i]
        y = F.conv2d(x, self.conv_weights[i], padding=1)
        if y.is_cuda:
            y = y.round()
        if i == 0:
            y = y / PIXEL_SCALE
        y = y + conv.bias[:, None, None]
        return bn(y if pool is None else pool(y))

    def dense(self, j: int, x: torch.Tensor) -> torch.Tensor:
        dense, bn, _ = self.dense_stages[j]
        return bn(x @ self.dense_weights[j] + dense.bias)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.scores(batch) for batch in pixels.split(BATCH)])

    def scores(self, pixels: torch.Tensor) -> torch.Tensor:
        x = centered_images(pixels)
        for i, (_, _, _, activation) in enumerate(self.convs):
            x = activation(self.conv(i, x))
        x = x.flatten(1)
        for j, (_, _, activation) in enumerate(self.dense_stages[:-1]):
            x = activation(self.dense(j, x))
        return self.dense(len(self.dense_stages) - 1, x)


# ---------------------------------------------------------------------------
# The parameters, as cifar10.py and svhn.py save them.
# ---------------------------------------------------------------------------

N_CONVS, N_DENSE = 6, 3
INPUT_SIZE = 32                     # CIFAR-10 and SVHN images: 3 x 32 x 32
DATASETS = {(128, 128, 256, 256, 512, 512): "cifar10", (64, 64, 128, 128, 256, 256): "svhn"}


def convnet_keys() -> set:
    names = [f"conv{i}" for i in range(1, N_CONVS + 1)] + [f"dense{j}" for j in range(1, N_DENSE + 1)]
    keys = {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    return keys | {f"bn{i}.{p}" for i in range(1, N_CONVS + N_DENSE + 1) for p in BN_KEYS}


def convnet_from_arrays(arrays: dict, path, size: int = INPUT_SIZE) -> ConvNet:
    """The ConvNet of cifar10.build_model from its state_dict arrays: conv1..6
    (a max-pool after conv2, conv4, conv6), dense1..3, bn1..9, for images of
    size x size pixels."""
    expected = convnet_keys()
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ParameterError(f"{path} has the wrong keys for a ConvNet (missing: {', '.join(missing) or 'none'}; "
                             f"unexpected: {', '.join(extra) or 'none'})")
    convs, c_in = [], 3
    for i in range(1, N_CONVS + 1):
        convs.append(ConvLayer(*read_layer(arrays, path, f"conv{i}", i, (None, c_in, 3, 3)), pool=i % 2 == 0))
        c_in, size = convs[-1].weight.shape[0], size // 2 if i % 2 == 0 else size
    dense, n_in = [], c_in * size * size
    for j in range(1, N_DENSE + 1):
        dense.append(Layer(*read_layer(arrays, path, f"dense{j}", N_CONVS + j, (None, n_in))))
        n_in = dense[-1].weight.shape[0]
    return ConvNet(convs, dense)


def filters(net: ConvNet) -> tuple:
    return tuple(c.weight.shape[0] for c in net.convs)
