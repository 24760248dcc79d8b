"""BinaryNet on SVHN: the paper's binarized ConvNet (Section 2.4, Table 1: 2.80%).

    python svhn.py                       # the paper's recipe: 200 epochs, batch 50

The CIFAR-10 network (cifar10.build_model) with half the filters:
64C3-64C3-MP2-128C3-128C3-MP2-256C3-256C3-MP2-1024FC-1024FC-10FC. Training is
train + extra less the validation set (598,388 images), kept as uint8 until batched.
"""
import binary_net  # sets THP_MEM_ALLOC_ENABLE (huge pages for large tensors) before torch's first tensor
import cifar10
import datasets

# The recipe of the reference svhn.py (all of its constants, in one place)
recipe = dict(
    description=__doc__.splitlines()[0],
    split_sizes=(598_388, 6_000, 26_032),  # train, valid, test (for --synthetic)
    input_shape=(3, 32, 32),
    batch_size=50,
    alpha=binary_net.BN_ALPHA,        # batch norm moving-average factor
    epsilon=binary_net.BN_EPSILON,    # batch norm epsilon
    filters=(64, 64, 128, 128, 256, 256),
    num_units=1024,                   # the two hidden fully connected layers
    num_epochs=200,
    H=1.0,
    W_LR_scale="Glorot",
    LR_start=0.001,
    LR_fin=0.000001,
    save_path="svhn_parameters.npz",
)

if __name__ == "__main__":
    binary_net.main(recipe, lambda args, binary=True: cifar10.model_from_args(args, binary, recipe), datasets.load_svhn)
