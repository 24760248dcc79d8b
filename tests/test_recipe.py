"""The recipe of the reference code, pinned: each property checked against an independent
statement of the reference (Lasagne's formulas in float64, the reference scripts' constants
and network tables as written here), never against the code's own constants read back."""
import numpy as np
import pytest
import torch

import binary_net as bn
import cifar10
import mnist


# ---------------------------------------------------------------------------
# Batch norm: Lasagne's BatchNormLayer (lasagne/layers/normalization.py) in float64


def lasagne_batch_norm(batches, gamma, beta, axes, epsilon=1e-4, alpha=0.1):
    """Lasagne's BatchNormLayer over a run of training batches, in float64 numpy.

    Per batch: mean and inv_std = 1 / sqrt(var + epsilon) (numpy's var: biased);
    output (x - mean) * (gamma * inv_std) + beta; moving averages
    (1 - alpha) * old + alpha * batch from mean 0, inv_std 1. Returns the training
    outputs and the evaluation function of the final averages."""
    shape = [1, -1] + [1] * (batches[0].ndim - 2)
    g, b = gamma.reshape(shape), beta.reshape(shape)
    mean_avg, inv_std_avg = np.zeros(gamma.size), np.ones(gamma.size)
    outputs = []
    for x in batches:
        mean, inv_std = x.mean(axis=axes), 1.0 / np.sqrt(x.var(axis=axes) + epsilon)
        outputs.append((x - mean.reshape(shape)) * (g * inv_std.reshape(shape)) + b)
        mean_avg = (1 - alpha) * mean_avg + alpha * mean
        inv_std_avg = (1 - alpha) * inv_std_avg + alpha * inv_std
    evaluate = lambda x: (x - mean_avg.reshape(shape)) * (g * inv_std_avg.reshape(shape)) + b
    return outputs, evaluate, mean_avg, inv_std_avg


def random_batches(shape, count, seed):
    """Batches whose scale and offset change from batch to batch (0.1x to 10x)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * 10 ** rng.uniform(-1, 1) + rng.uniform(-3, 3) for _ in range(count)]


def check_against_lasagne(norm, batches, axes):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) * 4 - 2)
        norm.bias.copy_(torch.rand(norm.bias.shape, generator=gen) * 2 - 1)
    gamma, beta = norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy()
    expected, evaluate, mean_avg, inv_std_avg = lasagne_batch_norm(batches, gamma, beta, axes)
    norm.train()
    for x, want in zip(batches, expected):
        got = norm(torch.as_tensor(x, dtype=torch.float32)).detach().double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(norm.running_mean.double().numpy(), mean_avg, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(norm.running_inv_std.double().numpy(), inv_std_avg, rtol=1e-3, atol=1e-3)
    norm.eval()
    x = random_batches(batches[0].shape, 1, seed=99)[0]
    got = norm(torch.as_tensor(x, dtype=torch.float32)).detach().double().numpy()
    np.testing.assert_allclose(got, evaluate(x), rtol=1e-3, atol=1e-3)


def test_dense_batch_norm_is_lasagnes():
    """mnist.build_model(64).bn1: axis 0 (the batch)."""
    check_against_lasagne(mnist.build_model(64).bn1, random_batches((100, 64), 12, seed=1), axes=0)


def test_conv_batch_norm_is_lasagnes():
    """cifar10.build_model's conv batch norm: axes batch and space; its dense one: batch."""
    model = cifar10.build_model((8, 8, 8, 8, 8, 8), 32)
    check_against_lasagne(model.bn1, random_batches((10, 8, 6, 5), 12, seed=2), axes=(0, 2, 3))
    check_against_lasagne(model.bn7, random_batches((50, 32), 12, seed=3), axes=0)


def test_pytorch_batch_norm_would_fail_the_lasagne_check():
    """The check has teeth: nn.BatchNorm1d (the unbiased variance averaged, 1/sqrt taken
    at evaluation) misses Lasagne's evaluation by more than the tolerance."""
    batches = random_batches((100, 64), 12, seed=1)
    torch_bn = torch.nn.BatchNorm1d(64, eps=1e-4, momentum=0.1)
    for x in batches:
        torch_bn(torch.as_tensor(x, dtype=torch.float32))
    ones, zeros = np.ones(64), np.zeros(64)
    _, evaluate, _, _ = lasagne_batch_norm(batches, ones, zeros, axes=0)
    x = random_batches((100, 64), 1, seed=99)[0]
    got = torch_bn.eval()(torch.as_tensor(x, dtype=torch.float32)).detach().double().numpy()
    assert not np.allclose(got, evaluate(x), rtol=1e-3, atol=1e-3)


def test_batch_norm_gradient_is_through_the_batch_statistics():
    """Training mode backpropagates through mean and inv_std, as Theano differentiated
    Lasagne's expression: checked against float64 autograd of the formula itself."""
    x = torch.randn(20, 6, dtype=torch.float64) * 3 + 1
    g = torch.randn(20, 6, dtype=torch.float64)
    norm = bn.BatchNorm(6)
    xf = x.float().requires_grad_()
    norm(xf).backward(g.float())
    x64 = x.clone().requires_grad_()
    mean, var = x64.mean(0), x64.var(0, unbiased=False)
    ((x64 - mean) / torch.sqrt(var + 1e-4)).backward(g)
    torch.testing.assert_close(xf.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
