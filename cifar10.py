"""BinaryNet on CIFAR-10: the paper's binarized ConvNet (Section 2.3, Table 1: 11.40%).

    python cifar10.py                    # the paper's recipe: 500 epochs, batch 50

128C3-128C3-MP2-256C3-256C3-MP2-512C3-512C3-MP2-1024FC-1024FC-10FC: 3x3 convolutions
padded by 1, batch norm after every layer (after the max-pool where there is one),
binary_tanh_unit after every hidden layer. No dropout, and, as in the reference code,
no GCN, no ZCA whitening and no data augmentation: pixels are only scaled to [-1, 1].
"""
from collections import OrderedDict

import binary_net  # sets THP_MEM_ALLOC_ENABLE (huge pages for large tensors) before torch's first tensor
import datasets
import torch.nn as nn

# The recipe of the reference cifar10.py (all of its constants, in one place)
recipe = dict(
    description=__doc__.splitlines()[0],
    split_sizes=(45_000, 5_000, 10_000),  # train, valid, test (for --synthetic)
    input_shape=(3, 32, 32),
    batch_size=50,
    alpha=binary_net.BN_ALPHA,        # batch norm moving-average factor
    epsilon=binary_net.BN_EPSILON,    # batch norm epsilon
    filters=(128, 128, 256, 256, 512, 512),
    num_units=1024,                   # the two hidden fully connected layers
    num_epochs=500,
    H=1.0,
    W_LR_scale="Glorot",
    LR_start=0.001,
    LR_fin=0.0000003,
    save_path="cifar10_parameters.npz",
)


def build_model(filters, num_units, H=1.0, W_LR_scale="Glorot", bn="standard", stochastic=False, binary=True,
                epsilon=binary_net.BN_EPSILON, alpha=binary_net.BN_ALPHA):
    """The paper's ConvNet: pairs of 3x3 binary convolutions, the second of each pair
    max-pooled before its batch norm, then two binary dense layers and the output layer.
    Module names conv1.., dense1.., bn1.. are the keys of the saved .npz."""
    opts = dict(binary=binary, stochastic=stochastic, H=H, W_LR_scale=W_LR_scale)
    norm = lambda n: binary_net.BATCH_NORMS[bn](n, epsilon=epsilon, alpha=alpha)
    layers, c_in, size = [], 3, 32
    for i, c_out in enumerate(filters, start=1):
        layers.append((f"conv{i}", binary_net.Conv2DLayer(c_in, c_out, **opts)))
        if i % 2 == 0:  # pooling comes before batch norm, as in the reference
            layers.append((f"pool{i // 2}", nn.MaxPool2d(2)))
            size //= 2
        layers += [(f"bn{i}", norm(c_out)), (f"act{i}", binary_net.activation(binary))]
        c_in = c_out
    n_in, n = c_in * size * size, len(filters)
    for j, n_out in enumerate([num_units, num_units, 10], start=1):
        layers += [(f"dense{j}", binary_net.DenseLayer(n_in, n_out, **opts)),
                   (f"bn{n + j}", norm(n_out))]
        if j < 3:
            layers.append((f"act{n + j}", binary_net.activation(binary)))
        n_in = n_out
    return nn.Sequential(OrderedDict(layers))


def model_from_args(args, binary=True, r=recipe):
    return build_model(r["filters"], args.hidden_units, r["H"], r["W_LR_scale"], args.bn, args.stochastic, binary,
                       r["epsilon"], r["alpha"])


if __name__ == "__main__":
    binary_net.main(recipe, model_from_args, datasets.load_cifar10)
