"""The paper's hardware-friendly variants: AP2, shift-based batch norm and AdaMax,
stochastic binarization, each against its formula recomputed in float64."""
import math

import numpy as np
import pytest
import torch

import binary_net as bn


def ap2_reference(x):
    """AP2 in float64 by its definition: sign(x) * 2^round(log2|x|)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.sign(x) * np.exp2(np.round(np.log2(np.abs(x))))


def is_power_of_two(t):
    """Every nonzero value is +-2^k: in float32 the 23 mantissa bits are zero."""
    bits = t.float().contiguous().view(torch.int32)
    return bool(torch.all(((bits & 0x7FFFFF) == 0) | (t == 0)))


def test_ap2_returns_the_nearest_signed_power_of_two_in_log2():
    torch.manual_seed(0)
    x = torch.randn(10000) * torch.exp2(torch.randint(-20, 20, (10000,)).float())
    p = bn.ap2(x)
    assert is_power_of_two(p)
    assert torch.equal(torch.sign(p), torch.sign(x))
    # nearest in log2: |log2|x| - log2|p|| <= 1/2, and it equals the float64 formula
    assert (torch.log2(x.abs()) - torch.log2(p.abs())).abs().max() <= 0.5 + 1e-6
    np.testing.assert_array_equal(p.numpy(), ap2_reference(x.numpy()).astype(np.float32))
    assert bn.ap2(torch.tensor([0.0, 1.0, -0.75, 3.0])).tolist() == [0.0, 1.0, -1.0, 4.0]


def shift_bn_reference(x, gamma, beta, eps):
    x = x.double()
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    ap = lambda t: torch.from_numpy(ap2_reference(t.numpy()))
    C = x - x.mean(dims, keepdim=True)
    var = (C * ap(C)).mean(dims, keepdim=True)
    return ap(gamma.double()).view(shape) * (C * ap(1 / torch.sqrt(var + eps))) + beta.double().view(shape), var


@pytest.mark.parametrize("shape", [(64, 7), (8, 5, 4, 4)])
def test_shift_batch_norm_equals_its_formula(shape):
    torch.manual_seed(1)
    norm = bn.ShiftBatchNorm(shape[1])
    with torch.no_grad():
        norm.weight.uniform_(-2, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(shape) * 3 + 1
    y = norm(x)
    expected, var = shift_bn_reference(x, norm.weight.detach(), norm.bias.detach(), bn.BN_EPSILON)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)
    # the multiplications it replaces are by powers of two
    assert is_power_of_two(bn.ap2(norm.weight)) and is_power_of_two(bn.ap2(torch.rsqrt(var.float().flatten() + 1e-4)))
    # moving averages, alpha 0.1, then used at evaluation
    assert torch.allclose(norm.running_inv_std.double(), 0.9 + 0.1 / torch.sqrt(var.flatten() + 1e-4), rtol=1e-5)
    norm.eval()
    y_eval = norm(x)
    assert torch.allclose(norm.running_mean, 0.1 * x.mean([d for d in range(x.dim()) if d != 1]), atol=1e-6)
    assert y_eval.shape == x.shape and not torch.allclose(y_eval, y)
    y.sum().backward()  # gradients flow through the rounding to gamma, beta and x
    assert norm.weight.grad is not None and norm.bias.grad is not None


def test_shift_adamax_equals_its_formula_with_glorot_scale_and_clip():
    torch.manual_seed(2)
    model = torch.nn.Sequential(bn.DenseLayer(6, 5), torch.nn.BatchNorm1d(5))
    layer = model[0]
    lr = 2.0 ** -10
    opt = bn.clipping_scaling(model, lr, optimizer="shift-adamax")
    b1, b2 = 1 - 2.0 ** -3, 1 - 2.0 ** -10
    params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    ap = lambda t: torch.as_tensor(ap2_reference(np.asarray(t)))
    x, y = torch.randn(10, 6), torch.randint(0, 5, (10,))
    for t in range(1, 5):
        loss = bn.squared_hinge_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters()}
        opt.step()
        bn.clip_weights(model)
        for n in params:
            scale = layer.W_LR_scale if n == "0.weight" else 1.0
            m[n] = b1 * m[n] + (1 - b1) * grads[n]
            v[n] = torch.maximum(b2 * v[n], grads[n].abs())
            rate = ap(lr * scale / (1 - b1 ** t))
            assert math.log2(abs(float(rate))).is_integer()  # a shift, Glorot scale included
            params[n] = params[n] - rate * m[n] * ap(1 / (v[n] + 1e-8))
            if n == "0.weight":
                params[n] = params[n].clamp(-1, 1)
        for n, p in model.named_parameters():
            assert torch.allclose(p.double(), params[n], rtol=1e-5, atol=1e-6), n


def test_stochastic_binarization_frequency_matches_hard_sigmoid():
    torch.manual_seed(3)
    W = torch.tensor([-1.0, -0.6, -0.2, 0.0, 0.3, 0.9, 1.0])
    n = 20000
    draws = bn.binarization(W.expand(n, -1).contiguous(), 1.0, stochastic=True)
    assert set(draws.unique().tolist()) == {-1.0, 1.0}
    freq = (draws == 1).double().mean(0)
    p = bn.hard_sigmoid(W).double()
    # binomial standard error sqrt(p(1-p)/n) <= 0.0036; 5 sigma keeps false alarms below 1e-6
    assert torch.all((freq - p).abs() <= 5 * 0.5 / math.sqrt(n) + 1e-12), (freq, p)
    assert freq[0] == 0 and freq[-1] == 1  # W = -H and +H are certain


def test_stochastic_model_is_evaluated_with_real_weights():
    torch.manual_seed(4)
    layer = bn.DenseLayer(8, 3, stochastic=True)
    x = torch.randn(2, 8)
    layer.eval()
    assert torch.allclose(layer(x), x @ layer.weight.t() + layer.bias)
    layer.train()
    out1, out2 = layer(x), layer(x)
    assert not torch.allclose(out1, out2)  # a new draw of the binary weights each pass


def test_scripts_take_the_variants_as_flags():
    import mnist
    args = bn.parse_args(mnist.recipe, ["--bn", "shift", "--optimizer", "shift-adamax", "--stochastic"])
    model = mnist.build_model(16, bn=args.bn, stochastic=args.stochastic)
    assert isinstance(model.bn1, bn.ShiftBatchNorm) and model.dense1.stochastic
    default = bn.parse_args(mnist.recipe, [])
    assert (default.bn, default.optimizer, default.stochastic) == ("standard", "adam", False)
