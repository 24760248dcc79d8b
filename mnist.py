"""BinaryNet on MNIST: the paper's binarized MLP (Section 2.1, Table 1: 0.96% test error).

    python mnist.py                      # the paper's recipe: 1000 epochs at 4096 units
    python mnist.py --epochs 1 --hidden-units 1024 --data-dir ../shared/data/mnist

dropout 0.2 -> 3 x [binary dense 4096 -> BN -> binary_tanh_unit -> dropout 0.5]
-> binary dense 10 -> BN, trained with the squared hinge loss.
"""
import math
from collections import OrderedDict

import binary_net  # sets THP_MEM_ALLOC_ENABLE (huge pages for large tensors) before torch's first tensor
import datasets
import torch.nn as nn

# The recipe of the reference mnist.py (all of its constants, in one place)
recipe = dict(
    description=__doc__.splitlines()[0],
    split_sizes=(50_000, 10_000, 10_000),  # train, valid, test (for --synthetic)
    input_shape=(1, 28, 28),
    batch_size=100,
    alpha=binary_net.BN_ALPHA,        # batch norm moving-average factor
    epsilon=binary_net.BN_EPSILON,    # batch norm epsilon
    num_units=4096,
    n_hidden_layers=3,
    num_epochs=1000,
    dropout_in=0.2,
    dropout_hidden=0.5,
    H=1.0,
    W_LR_scale="Glorot",
    LR_start=0.003,
    LR_fin=0.0000003,
    save_path="mnist_parameters.npz",
)


def build_model(num_units=recipe["num_units"], n_hidden_layers=recipe["n_hidden_layers"], bn="standard",
                stochastic=False, binary=True):
    """The MLP, with module names dense1.., bn1.. that the saved .npz keys carry."""
    r = recipe
    dense = dict(binary=binary, stochastic=stochastic, H=r["H"], W_LR_scale=r["W_LR_scale"])
    norm = lambda n: binary_net.BATCH_NORMS[bn](n, epsilon=r["epsilon"], alpha=r["alpha"])
    layers = [("dropout_in", nn.Dropout(r["dropout_in"]))]
    n_in = math.prod(r["input_shape"])
    for i in range(1, n_hidden_layers + 1):
        layers += [(f"dense{i}", binary_net.DenseLayer(n_in, num_units, **dense)),
                   (f"bn{i}", norm(num_units)),
                   (f"act{i}", binary_net.activation(binary)),
                   (f"dropout{i}", nn.Dropout(r["dropout_hidden"]))]
        n_in = num_units
    i = n_hidden_layers + 1
    layers += [(f"dense{i}", binary_net.DenseLayer(n_in, 10, **dense)),
               (f"bn{i}", norm(10))]
    return nn.Sequential(OrderedDict(layers))


def model_from_args(args, binary=True):
    return build_model(args.hidden_units, bn=args.bn, stochastic=args.stochastic, binary=binary)


if __name__ == "__main__":
    binary_net.main(recipe, model_from_args, datasets.load_mnist)
