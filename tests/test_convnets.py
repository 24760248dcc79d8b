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


@pytest.mark.parametrize("script", ["cifar10.py", "svhn.py"])
def test_convnet_script_runs_end_to_end_on_files_in_the_real_format(tmp_path, script):
    """The whole command line on small files written as the data sets publish them."""
    import subprocess
    import sys

    import numpy as np
    from conftest import ROOT
    from test_datasets import cifar_members, write_cifar_tar, write_svhn

    data = tmp_path / "data"
    if script == "cifar10.py":
        write_cifar_tar(data / "cifar-10-python.tar.gz", cifar_members(per_batch=1100, n_test=30))
    else:
        write_svhn(data)
    metrics, params = tmp_path / "m.jsonl", tmp_path / "p.npz"
    r = subprocess.run([sys.executable, str(ROOT / script), "--epochs", "1", "--limit", "20", "--batch-size",
                        "10", "--data-dir", str(data), "--metrics", str(metrics), "--save-path", str(params),
                        "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stderr  # the files' checksums differ from the published ones
    assert "splits: train 20, valid 20, test 20" in r.stdout and "test error rate:" in r.stdout
    assert len(metrics.read_text().splitlines()) == 1 and metrics.with_suffix(".png").exists()
    with np.load(params) as f:
        assert f["conv1.weight"].shape[1:] == (3, 3, 3) and f["dense3.weight"].shape == (10, 1024)
    assert params.with_suffix(".ckpt").exists()
