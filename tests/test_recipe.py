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


# ---------------------------------------------------------------------------
# The networks, as tables written from the reference scripts


def describe(model):
    """(name, kind, details) per module: the facts the reference scripts fix."""
    rows = []
    for name, m in model.named_children():
        if isinstance(m, torch.nn.Dropout):
            rows.append((name, "dropout", m.p))
        elif isinstance(m, bn.Conv2DLayer):
            assert m.kernel_size == (3, 3) and m.padding == (1, 1) and m.stride == (1, 1)
            rows.append((name, "conv", m.in_channels, m.out_channels))
        elif isinstance(m, bn.DenseLayer):
            rows.append((name, "dense", m.in_features, m.out_features))
        elif isinstance(m, torch.nn.MaxPool2d):
            assert m.kernel_size == 2 and m.stride == 2
            rows.append((name, "pool"))
        elif isinstance(m, bn.BatchNorm):
            rows.append((name, "bn", m.weight.numel(), m.epsilon, m.alpha))
        elif isinstance(m, bn.BinaryTanh):
            rows.append((name, "sign"))
        else:
            raise AssertionError(f"unexpected module {name}: {m}")
    return rows


def mnist_table(units):
    """dropout 0.2 -> 3 x [dense -> BN -> sign -> dropout 0.5] -> dense 10 -> BN."""
    rows, n_in = [("dropout_in", "dropout", 0.2)], 784
    for i in (1, 2, 3):
        rows += [(f"dense{i}", "dense", n_in, units), (f"bn{i}", "bn", units, 1e-4, 0.1),
                 (f"act{i}", "sign"), (f"dropout{i}", "dropout", 0.5)]
        n_in = units
    return rows + [("dense4", "dense", units, 10), ("bn4", "bn", 10, 1e-4, 0.1)]


def convnet_table(filters, units):
    """xC3-xC3-MP2 three times, BN after every layer (after the pool where there is
    one), then 1024FC-1024FC-10FC; no dropout; no activation after the output BN."""
    rows, c_in = [], 3
    for i, c in enumerate(filters, 1):
        rows.append((f"conv{i}", "conv", c_in, c))
        if i % 2 == 0:
            rows.append((f"pool{i // 2}", "pool"))
        rows += [(f"bn{i}", "bn", c, 1e-4, 0.1), (f"act{i}", "sign")]
        c_in = c
    n_in = filters[-1] * 4 * 4  # 32 / 2^3 = 4
    for j, n_out in enumerate((units, units, 10), 1):
        rows += [(f"dense{j}", "dense", n_in, n_out), (f"bn{6 + j}", "bn", n_out, 1e-4, 0.1)]
        rows += [(f"act{6 + j}", "sign")] if j < 3 else []
        n_in = n_out
    return rows


def assert_biases_zero_and_weights_uniform(model):
    for layer in bn.binary_layers(model):
        assert layer.bias is not None and torch.all(layer.bias == 0)
        assert layer.weight.abs().max() <= 1 and layer.H == 1.0


def test_mnist_network_is_the_references():
    model = mnist.build_model()
    assert describe(model) == mnist_table(4096)
    assert_biases_zero_and_weights_uniform(model)


CIFAR10_FILTERS, SVHN_FILTERS = (128, 128, 256, 256, 512, 512), (64, 64, 128, 128, 256, 256)


@pytest.mark.parametrize("script, filters", [("cifar10", CIFAR10_FILTERS), ("svhn", SVHN_FILTERS)])
def test_convnets_are_the_references(script, filters):
    """Built as the script builds it, from its command line's defaults."""
    module = __import__(script)
    args = bn.parse_args(module.recipe, [])
    model = cifar10.model_from_args(args, r=module.recipe)
    assert describe(model) == convnet_table(filters, 1024)
    assert_biases_zero_and_weights_uniform(model)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------
# Each script's recipe, as its command line hands it to the training loop


REFERENCE = {  # batch size, epochs, LR_start, LR_fin, hidden units
    "mnist": (100, 1000, 0.003, 3e-7, 4096),
    "cifar10": (50, 500, 0.001, 3e-7, 1024),
    "svhn": (50, 200, 0.001, 1e-6, 1024),
}


@pytest.mark.parametrize("script", sorted(REFERENCE))
def test_script_runs_the_references_recipe(script, monkeypatch, capsys):
    """binary_net.main with every default: what reaches train() and the network."""
    module = __import__(script)
    seen = {}

    def fake_train(model, optimizer, data, batch_size, LR_start, LR_fin, num_epochs, **kw):
        seen.update(batch_size=batch_size, LR_start=LR_start, LR_fin=LR_fin, num_epochs=num_epochs,
                    units=model.dense1.out_features)

    shape = module.recipe["input_shape"]
    split = (np.zeros((200, *shape), np.uint8), np.zeros(200, np.int64))
    monkeypatch.setattr(bn, "train", fake_train)
    builder = mnist.model_from_args if script == "mnist" else (
        lambda args, binary=True: cifar10.model_from_args(args, binary, module.recipe))
    bn.main(module.recipe, builder, lambda data_dir: dict(train=split, valid=split, test=split), argv=[])
    batch, epochs, lr_start, lr_fin, units = REFERENCE[script]
    assert seen == dict(batch_size=batch, LR_start=lr_start, LR_fin=lr_fin, num_epochs=epochs, units=units)


def test_pixels_scaled_to_minus_one_one():
    """2x / 255 - 1, through the function the loop uses, against float64."""
    x = torch.arange(256, dtype=torch.uint8)
    np.testing.assert_allclose(bn.scale_pixels(x).double().numpy(), 2 * np.arange(256) / 255.0 - 1,
                               rtol=0, atol=2.5e-7)  # two float32 roundings


# ---------------------------------------------------------------------------
# The training loop (the reference binary_net.train)


class Spy(torch.nn.Module):
    """A one-layer BNN that records, in training mode, which examples each step saw
    (example i carries i in its first two pixels) and the learning rate of the step."""

    def __init__(self):
        super().__init__()
        self.dense1 = bn.DenseLayer(4, 2)
        self.steps, self.optimizer = [], None

    def forward(self, x):
        if self.training:
            ids = ((x[:, 0] + 1) * 255 / 2).round().long() * 256 + ((x[:, 1] + 1) * 255 / 2).round().long()
            lrs = [g["lr"] / g["scale"] for g in self.optimizer.param_groups]
            self.steps.append((ids.tolist(), lrs))
        return self.dense1(x)


def spy_run(n, batch_size, num_epochs, tmp_path=None):
    ids = torch.arange(n)
    X = torch.stack([ids // 256, ids % 256, torch.zeros(n, dtype=torch.long), ids % 7], 1).to(torch.uint8)
    y = ids % 2
    model = Spy()
    model.optimizer = bn.clipping_scaling(model, 0.003)
    data = {"train": (X, y), "valid": (X[:10], y[:10]), "test": (X[:10], y[:10])}
    rows = bn.train(model, model.optimizer, data, batch_size, 0.003, 3e-7, num_epochs, progress=False,
                    log=lambda line: None)
    per_epoch = len(model.steps) // num_epochs
    epochs = [model.steps[e * per_epoch:(e + 1) * per_epoch] for e in range(num_epochs)]
    return epochs, rows


def test_loop_reshuffles_every_epoch_and_trains_on_full_batches_only():
    n, batch = 1030, 100  # 10 full batches; 30 examples left out, a different 30 each epoch
    epochs, _ = spy_run(n, batch, 4)
    orders, left_out = [], []
    for steps in epochs:
        assert len(steps) == n // batch and all(len(ids) == batch for ids, _ in steps)
        order = [i for ids, _ in steps for i in ids]
        assert len(set(order)) == len(order) and set(order) <= set(range(n))
        orders.append(order)
        left_out.append(set(range(n)) - set(order))
    assert orders[0] != sorted(orders[0])  # shuffled before the first epoch too
    assert all(a != b for a, b in zip(orders, orders[1:]))
    assert all(a != b for a, b in zip(left_out, left_out[1:]))


def test_loop_decays_the_learning_rate_once_per_epoch():
    """Epoch e (from 0) runs at LR_start * (LR_fin / LR_start)^(e / num_epochs), every
    parameter group (the binary weights' group scaled by its Glorot factor)."""
    epochs, rows = spy_run(300, 100, 5)
    for e, steps in enumerate(epochs):
        want = 0.003 * (3e-7 / 0.003) ** (e / 5)
        for _, lrs in steps:
            assert lrs == pytest.approx([want] * len(lrs), rel=1e-12)
        assert rows[e]["lr"] == pytest.approx(want, rel=1e-12)


def test_test_error_is_taken_when_val_err_ties_the_best(monkeypatch):
    """`if val_err <= best_val_err`: a tie moves the best epoch and takes a new test error."""
    val_errs = iter([5.0, 5.0, 6.0, 4.0, 4.0, 4.5])
    test_calls = []

    def fake_evaluate(model, X, y, batch_size):
        if X is fake_evaluate.test_X:
            test_calls.append(len(test_calls))
            return 0.1, 10.0 + len(test_calls)
        return 0.2, next(val_errs)

    model = Spy()
    model.optimizer = bn.clipping_scaling(model, 0.003)
    X = torch.zeros(200, 4, dtype=torch.uint8)
    y = torch.zeros(200, dtype=torch.long)
    fake_evaluate.test_X = X[:5].clone()
    data = {"train": (X, y), "valid": (X[:5], y[:5]), "test": (fake_evaluate.test_X, y[:5])}
    monkeypatch.setattr(bn, "evaluate", fake_evaluate)
    rows = bn.train(model, model.optimizer, data, 100, 0.003, 3e-7, 6, progress=False, log=lambda line: None)
    assert [r["best_epoch"] for r in rows] == [1, 2, 2, 4, 5, 5]
    assert [r["best_val_err"] for r in rows] == [5.0, 5.0, 5.0, 4.0, 4.0, 4.0]
    assert [r["test_err"] for r in rows] == [11.0, 12.0, 12.0, 13.0, 14.0, 14.0]
    assert len(test_calls) == 4  # the test set is evaluated at each new (or tied) best only
