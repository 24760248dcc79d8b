"""The CIFAR-10 and SVHN ConvNets: one training step on random data."""
import pytest
import torch

import binary_net as bn
import cifar10
import svhn


@pytest.mark.parametrize("recipe", [cifar10.recipe, svhn.recipe], ids=["cifar10", "svhn"])
def test_one_training_step_of_the_papers_convnet(recipe):
    torch.manual_seed(0)
    model = cifar10.build_model(recipe["filters"], recipe["num_units"])
    # pooling comes before batch norm in every pooled block
    names = [n for n, _ in model.named_children()]
    for p in ("pool1", "pool2", "pool3"):
        assert names[names.index(p) + 1].startswith("bn")
    opt = bn.clipping_scaling(model, recipe["LR_start"])
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 3, 7, 9])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    assert model(bn.scale_pixels(x)).shape == (4, 10)
    bn.train_step(model, opt, x, y)
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} was not updated"
    for layer in bn.binary_layers(model):
        assert set(bn.binarization(layer.weight, layer.H).unique().tolist()) == {-1.0, 1.0}
        assert layer.weight.abs().max() <= layer.H


def test_loss_falls_on_a_tiny_fixed_batch():
    torch.manual_seed(0)
    model = cifar10.build_model((16, 16, 32, 32, 64, 64), 64)
    opt = bn.clipping_scaling(model, 0.01)
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(20) % 10
    losses = [bn.train_step(model, opt, x, y).item() for _ in range(15)]
    assert min(losses[-3:]) < 0.7 * losses[0], losses


def test_convnet_scripts_share_the_flags_of_mnist():
    args = bn.parse_args(cifar10.recipe, [])
    assert (args.epochs, args.batch_size, args.hidden_units) == (500, 50, 1024)
    args = bn.parse_args(svhn.recipe, ["--epochs", "3"])
    assert (args.epochs, args.batch_size) == (3, 50)
    assert svhn.recipe["LR_fin"] == 1e-6 and cifar10.recipe["LR_fin"] == 3e-7
