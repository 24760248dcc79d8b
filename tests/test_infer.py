"""The 1-bit MNIST network (infer.py): threshold folding against the float path
for every accumulator, the network layer by layer and end to end (bit for bit
the float path's predictions), --infer on the real test set (skipped where
MNIST is absent; conftest's mnist_dir), and bad parameter files."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import binary_net
import binary_ops as bo
import infer
from binary_net import sign
from helpers import ROOT, needs_cuda, scale_pixels, unpack


# ---------------------------------------------------------------------------
# Threshold folding: batch norm + sign as one integer comparison
# ---------------------------------------------------------------------------

def make_layer(n_out, n_in, seed, trained_like=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    weight = torch.rand(n_out, n_in, generator=gen) * 2 - 1
    if trained_like:    # batch statistics of +-1 inputs: mean ~ 0, var ~ fan-in
        bias, mean = 0.01 * r(n_out), n_in ** 0.5 * r(n_out)
        var = n_in * (0.5 + torch.rand(n_out, generator=gen))
        gamma, beta = 1 + 0.3 * r(n_out), 0.3 * r(n_out)
    else:
        bias, mean = r(n_out), 10 * r(n_out)
        var = torch.rand(n_out, generator=gen) * 100
        gamma, beta = r(n_out), r(n_out)
    gamma[:4] = torch.tensor([0.0, 0.0, -0.0, -1.5])
    beta[:4] = torch.tensor([0.0, -0.25, -1.0, 0.0])
    # exact ties: BN output is exactly 0 at an integer accumulator
    mean[4:8], bias[4:8], beta[4:8], gamma[4:6] = torch.tensor([3.0, -5.0, 0.0, 2.0]), 0.0, 0.0, 1.0
    gamma[6:8] = -2.0
    gamma[8], var[8], beta[8] = 1e-30, 1e6, -1e-37   # extremes of float32
    return infer.Layer(weight, bias, infer.BatchNorm(gamma, beta, mean, torch.rsqrt(var + infer.BN_EPS)))


@pytest.mark.parametrize("trained_like", [False, True])
@pytest.mark.parametrize("k", [1, 64, 4096])
def test_fold_threshold_every_accumulator(k, trained_like):
    """For every possible accumulator d in [-K, K] the folded test
    direction * d >= t is the float path's sign(BN(d + bias))."""
    layer = make_layer(40, k, seed=k, trained_like=trained_like)
    direction, t = infer.fold_threshold(layer, lambda d: d.float(), k)
    d = torch.arange(-k, k + 1)[:, None]
    expected = layer.bn(d.float() + layer.bias) >= 0
    assert torch.equal(direction * d >= t, expected)


def test_fold_threshold_cases():
    layer = make_layer(10, 16, seed=0)
    direction, t = infer.fold_threshold(layer, lambda d: d.float(), 16)
    assert t[0] == -16 and t[1] == 17             # gamma = 0: always +1 (beta = 0), never
    assert t[4] == 3 and direction[4] == 1        # tie at d = 3 decides +1
    assert direction[6] == -1 and t[6] == 0       # gamma < 0: +1 for d <= 0


@pytest.mark.parametrize("trained_like", [False, True])
def test_batch_norm_is_the_training_modules_to_the_bit(trained_like):
    """The folding evaluates infer.BatchNorm; the float path, the training code's
    binary_net.BatchNorm in eval mode: the same float32 arithmetic, bit for bit."""
    layer = make_layer(300, 64, seed=12, trained_like=trained_like)
    module = binary_net.BatchNorm(300).eval()
    module.load_state_dict({key: getattr(layer.bn, name) for key, name in infer.BN_KEYS.items()})
    x = 30 * torch.randn(500, 300, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert torch.equal(module(x), layer.bn(x))


@pytest.mark.parametrize("trained_like", [False, True])
def test_hidden_layer_matches_float_path(trained_like):
    layers = [make_layer(96, 784, 1), make_layer(200, 96, 2, trained_like), make_layer(10, 200, 3)]
    xnor_net, float_net = infer.XnorMLP(layers), infer.FloatMLP(layers)
    gen = torch.Generator().manual_seed(4)
    x = torch.where(torch.rand(300, 96, generator=gen) < 0.5, 1.0, -1.0)
    expected = sign(float_net.hidden(1, x))
    assert torch.equal(unpack(xnor_net.hidden[0].fire(bo.pack(x)), 200), expected)


def test_first_layer_bit_planes_match_float_path():
    layers = [make_layer(130, 784, 5, trained_like=True), make_layer(10, 130, 6)]
    xnor_net, float_net = infer.XnorMLP(layers), infer.FloatMLP(layers)
    gen = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (500, 784), dtype=torch.uint8, generator=gen)
    pixels[:, ::3] = 0
    d = xnor_net.first.accumulate(bo.bit_planes(pixels))
    w = sign(layers[0].weight) * torch.where(layers[0].bn.gamma >= 0, 1.0, -1.0)[:, None]
    assert torch.equal(d.long(), (2 * pixels.long() - 255) @ w.long().T)   # 255 (x . w), exact
    expected = sign(float_net.hidden(0, infer.centered_pixels(pixels)))
    assert torch.equal(unpack(xnor_net.first.fire(bo.bit_planes(pixels)), 130), expected)


def test_network_predictions_match_on_random_pixels(cpu_path):
    layers = [make_layer(70, 784, 8, True), make_layer(70, 70, 9, True),
              make_layer(70, 70, 10, True), make_layer(10, 70, 11, True)]
    pixels = torch.randint(0, 256, (64, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    xnor_scores, float_scores = infer.XnorMLP(layers)(pixels), infer.FloatMLP(layers)(pixels)
    assert torch.equal(xnor_scores, float_scores)


# ---------------------------------------------------------------------------
# --infer end to end, and the command line's errors
# ---------------------------------------------------------------------------

def save_network(path, hidden, pixels, seed=0):
    """A random network with batch-norm statistics taken from real images
    (so activations are balanced, as in a trained network)."""
    rng = np.random.default_rng(seed)
    arrays, n_in, x = {}, 784, scale_pixels(pixels)
    for i, n_out in enumerate([hidden, hidden, hidden, 10], 1):
        weight = rng.uniform(-1, 1, (n_out, n_in)).astype(np.float32)
        bias = rng.normal(0, 0.1, n_out).astype(np.float32)
        pre = x @ sign(torch.as_tensor(weight)).T + torch.as_tensor(bias)
        gamma = rng.normal(1, 0.5, n_out).astype(np.float32)
        gamma[:2] = [0.0, -1.0]
        beta = rng.normal(0, 0.3, n_out).astype(np.float32)
        arrays.update({f"dense{i}.weight": weight, f"dense{i}.bias": bias,
                       f"bn{i}.weight": gamma, f"bn{i}.bias": beta,
                       f"bn{i}.running_mean": pre.mean(0).numpy(),
                       f"bn{i}.running_inv_std": torch.rsqrt(pre.var(0) + infer.BN_EPS).numpy()})
        bn = infer.BatchNorm(*(torch.as_tensor(arrays[f"bn{i}.{p}"]) for p in infer.BN_KEYS))
        x, n_in = sign(bn(pre)), n_out
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    import datasets
    X, y = datasets.load_mnist(mnist_dir, download=False)["test"]
    return torch.as_tensor(X).reshape(len(X), -1), torch.as_tensor(y)


def test_infer_end_to_end(tmp_path, mnist_dir, mnist_test, capsys):
    npz, out = tmp_path / "net.npz", tmp_path / "infer.json"
    save_network(npz, 256, mnist_test[0][:1000])
    assert bo.main(["--infer", str(npz), "--data-dir", str(mnist_dir), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"float_err", "xnor_err", "identical", "float_ms", "xnor_ms",
            "bytes_32bit", "bytes_1bit"} <= set(result)
    assert result["identical"] is True and result["float_err"] == result["xnor_err"]
    assert result["bytes_1bit"] < result["bytes_32bit"] / 20
    assert "predictions identical: yes" in capsys.readouterr().out


def test_float_path_agrees_with_mnist_build_model(tmp_path, mnist_test):
    """The lead's model (mnist.build_model) in eval mode predicts as FloatMLP.
    It adds the bias inside F.linear and may compute batch norm as a fused
    scale and shift, so scores differ by rounding; predictions must agree."""
    mnist = pytest.importorskip("mnist")
    if not hasattr(mnist, "build_model"):
        pytest.skip("mnist.build_model not written yet")
    arrays = save_network(tmp_path / "net.npz", 256, mnist_test[0][:1000])
    model = mnist.build_model(256)
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()},
                                                strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    model.eval()
    pixels = mnist_test[0][:2000]
    with torch.no_grad():
        theirs = model(scale_pixels(pixels).view(-1, 1, 28, 28)).argmax(1)
    ours = infer.FloatMLP(infer.load_parameters(tmp_path / "net.npz"))(pixels).argmax(1)
    assert (theirs != ours).sum() <= 2


def bad_npz_files(tmp_path):
    good = {f"dense{i}.weight": np.zeros((4, 784 if i == 1 else 4), np.float32) for i in range(1, 5)}
    good |= {f"dense{i}.bias": np.zeros(4, np.float32) for i in range(1, 5)}
    good |= {f"bn{i}.{p}": np.ones(4, np.float32) for i in range(1, 5) for p in infer.BN_KEYS}
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    np.savez(tmp_path / "keys.npz", **{k: v for k, v in good.items() if k != "bn3.running_inv_std"})
    np.savez(tmp_path / "shape.npz", **(good | {"dense2.weight": np.zeros((4, 5), np.float32)}))
    np.savez(tmp_path / "vector.npz", **(good | {"bn1.bias": np.zeros(5, np.float32)}))
    return {"missing": tmp_path / "missing.npz", "corrupt": tmp_path / "corrupt.npz",
            "keys": tmp_path / "keys.npz", "shape": tmp_path / "shape.npz",
            "vector": tmp_path / "vector.npz"}


@pytest.mark.parametrize("case", ["missing", "corrupt", "keys", "shape", "vector"])
def test_infer_bad_parameters(tmp_path, capsys, case):
    path = bad_npz_files(tmp_path)[case]
    assert bo.main(["--infer", str(path), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binary_ops: error:") and err.count("\n") == 1


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "binary_ops.py"), "--infer",
                             str(tmp_path / "nope.npz"), "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_infer_missing_data_dir(tmp_path, mnist_dir, capsys):
    pytest.importorskip("datasets")
    npz = tmp_path / "net.npz"
    save_network(npz, 16, torch.zeros(10, 784, dtype=torch.uint8))
    assert bo.main(["--infer", str(npz), "--data-dir", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@needs_cuda
def test_cuda_network_matches_cpu():
    layers = [make_layer(100, 784, 8, True), make_layer(100, 100, 9, True),
              make_layer(100, 100, 10, True), make_layer(10, 100, 11, True)]
    pixels = torch.randint(0, 256, (300, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cpu_scores = infer.XnorMLP(layers)(pixels)
    cuda_net = infer.XnorMLP([layer.to("cuda") for layer in layers])
    assert torch.equal(cuda_net(pixels.cuda()).cpu(), cpu_scores)
    assert torch.equal(bo.bit_planes(pixels.cuda()).cpu(), bo.bit_planes(pixels))


def test_parameters_with_pytorch_running_var_are_converted_with_a_note(tmp_path, capsys):
    """An .npz saved before batch norm kept Lasagne's inv_std holds bnN.running_var, which
    such a model evaluated as 1 / sqrt(var + eps): loaded as that inv_std, with a note."""
    gen = torch.Generator().manual_seed(3)
    arrays = save_network(tmp_path / "new.npz", 64, torch.randint(0, 256, (200, 784), dtype=torch.uint8,
                                                                   generator=gen))
    old = {k.replace("running_inv_std", "running_var"): (1 / v.astype(np.float64) ** 2 - infer.BN_EPS
                                                          if k.endswith("running_inv_std") else v)
           for k, v in arrays.items()}
    np.savez(tmp_path / "old.npz", **old)
    new_layers, old_layers = infer.load_parameters(tmp_path / "new.npz"), infer.load_parameters(tmp_path / "old.npz")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "running_var" in err and "converted" in err
    for a, b in zip(new_layers, old_layers):
        torch.testing.assert_close(b.bn.inv_std, a.bn.inv_std, rtol=1e-6, atol=0)
    pixels = torch.randint(0, 256, (500, 784), dtype=torch.uint8, generator=gen)
    assert torch.equal(infer.FloatMLP(new_layers)(pixels).argmax(1), infer.FloatMLP(old_layers)(pixels).argmax(1))
