"""Tests of the 1-bit ConvNets (infer_convnet.py): each binary conv layer bit
for bit against the float path (odd sizes and channel counts, borders,
gamma < 0, gamma = 0, ties at the threshold, pooled and not), whole networks
score for score, the float path against cifar10.build_model in eval mode,
and the parameter file's errors.  No timing is asserted."""
import json

import numpy as np
import pytest
import torch

import binary_net
import binary_ops as bo
import cifar10
import convnet as cn
import infer
import infer_convnet as ic
from helpers import ROOT, needs_cuda, unpack


def identity_bn(n):
    return infer.BatchNorm(torch.ones(n), torch.zeros(n), torch.zeros(n), torch.ones(n))


def conv_layer(c_out, c_in, pool, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(c_out, c_in, 3, 3, generator=gen) * 2 - 1
    return cn.ConvLayer(weight, 0.1 * torch.randn(c_out, generator=gen), identity_bn(c_out), pool)


def set_statistics(bn, pre, dims, seed, ties=False):
    """Batch norm as training leaves it: the mean and inv_std of the pre-activations
    (integers, or integers / 255), random gamma and beta, gamma = 0 and < 0 on
    the first units; with ties, BN is exactly 0 at an integer accumulator."""
    gen = torch.Generator().manual_seed(seed)
    n = pre.shape[1]
    var, mean = torch.var_mean(pre, dims, correction=0)
    bn.mean, bn.inv_std = mean, torch.rsqrt(var + infer.BN_EPS)
    bn.gamma, bn.beta = 1 + 0.5 * torch.randn(n, generator=gen), 0.3 * torch.randn(n, generator=gen)
    bn.gamma[:3] = torch.tensor([0.0, -1.0, -0.0])[: n]
    bn.beta[:1] = -0.5
    if ties:   # every unit: BN(x) = 0 at x = a value the pre-activations take
        bn.mean = pre.flatten(2).amax(2).median(0).values if pre.dim() > 2 else pre.median(0).values
        bn.beta[:] = 0.0
        bn.gamma[1:] = torch.where(torch.arange(1, n) % 2 == 0, 1.0, -2.0)


def trained_like(net, pixels, seed=0, ties=False):
    """Every batch norm set from the float path's own pre-activations, layer by layer."""
    float_net = cn.FloatConvNet(net)
    x = cn.centered_images(pixels)
    for i, layer in enumerate(net.convs):
        layer.bn = identity_bn(len(layer.bias))
        float_net = cn.FloatConvNet(net)
        pre = float_net.conv(i, x)
        set_statistics(layer.bn, pre, (0, 2, 3), seed + i, ties)
        float_net = cn.FloatConvNet(net)
        x = bo.sign(float_net.conv(i, x))
    x = x.flatten(1)
    for j, layer in enumerate(net.dense):
        layer.bn = identity_bn(len(layer.bias))
        pre = cn.FloatConvNet(net).dense(j, x)
        set_statistics(layer.bn, pre, (0,), seed + 10 + j)
        x = bo.sign(cn.FloatConvNet(net).dense(j, x))
    return net


def random_net(filters, units, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    convs, c_in = [], 3
    for i, c_out in enumerate(filters, 1):
        convs.append(conv_layer(c_out, c_in, i % 2 == 0, seed + i))
        c_in, size = c_out, size // 2 if i % 2 == 0 else size
    dense, n_in = [], c_in * size * size
    for n_out in (units, units, 10):
        weight = torch.rand(n_out, n_in, generator=gen) * 2 - 1
        dense.append(infer.Layer(weight, 0.1 * torch.randn(n_out, generator=gen), identity_bn(n_out)))
        n_in = n_out
    return cn.ConvNet(convs, dense)


def random_pixels(n, h, w, seed):
    pixels = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    pixels[0] = 0           # extremes: every bit plane clear, and set
    pixels[1] = 255
    return pixels


# ---------------------------------------------------------------------------
# One layer at a time, bit for bit
# ---------------------------------------------------------------------------

def run_layer(conv, source, batch, h, w):
    """A BinaryConv on packed (or pixel) rows; its output as +-1, NHWC."""
    out = conv(source, conv.plan(batch, h, w, "cpu"))
    assert not out[-1].any(), "the last row is the padding's all-0 row"
    n_out = conv.tap_sums.shape[0]
    return unpack(out[:-1], n_out).view(batch, -1, n_out)


def float_layer_signs(net, i, x):
    y = bo.sign(cn.FloatConvNet(net).conv(i, x))
    return y.permute(0, 2, 3, 1).reshape(len(y), -1, y.shape[1])


SIZES = [(1, 1), (1, 5), (2, 3), (3, 2), (5, 7), (8, 8), (6, 1)]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("c_in,c_out", [(5, 7), (64, 65), (70, 128), (130, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_binary_conv_layer_matches_float_path(h, w, pool, c_in, c_out, ties):
    """A hidden conv layer: odd sizes (borders everywhere, floor-mode pools,
    1-pixel images), channels past a word (padding bits), gamma < 0 and 0,
    ties at the threshold."""
    if pool and (h < 2 or w < 2):
        pytest.skip("no 2x2 window")
    batch, seed = 6, h * 100 + w * 10 + c_in + c_out
    gen = torch.Generator().manual_seed(seed)
    x = torch.where(torch.rand(batch, c_in, h, w, generator=gen) < 0.5, 1.0, -1.0)
    x[0] = 1.0                                  # all +1: every correction at its extreme
    net = cn.ConvNet([conv_layer(3, 3, False, 0), conv_layer(c_out, c_in, pool, seed)], [])
    pre = cn.FloatConvNet(net).conv(1, x)
    set_statistics(net.convs[1].bn, pre, (0, 2, 3), seed, ties)
    expected = float_layer_signs(net, 1, x)
    source = torch.cat([bo.pack(x.permute(0, 2, 3, 1).reshape(-1, c_in)),
                        torch.zeros(1, bo.words(c_in), dtype=torch.int64)])
    assert torch.equal(run_layer(ic.BinaryConv(net.convs[1], first=False), source, batch, h, w), expected)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_first_layer_bit_planes_match_float_path(h, w, pool, ties):
    """The first layer: 8 bit planes of the 3 colours, 0 pixels around the
    image (the float path's zero padding of 2 p / 255 - 1 is p = 127.5:
    the correction does it exactly)."""
    if pool and (h < 2 or w < 2):
        pytest.skip("no 2x2 window")
    batch, seed = 7, h * 10 + w
    pixels = random_pixels(batch, h, w, seed)
    net = cn.ConvNet([conv_layer(70, 3, pool, seed)], [])
    x = cn.centered_images(pixels)
    set_statistics(net.convs[0].bn, cn.FloatConvNet(net).conv(0, x), (0, 2, 3), seed, ties)
    expected = float_layer_signs(net, 0, x)
    got = run_layer(ic.BinaryConv(net.convs[0], first=True), ic.pixel_rows(pixels), batch, h, w)
    assert torch.equal(got, expected)


def test_border_classes_and_corrections():
    """window_taps marks the padding; the window classes of two 3 x 4 images:
    the 2 interior pixels share one, each edge and corner has its own (9 in
    all), and a class's thresholds move by its padding taps' weight sums."""
    taps = ic.window_taps(3, 4)
    assert taps.shape == (12, 9) and taps[5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert (taps[0] < 0).tolist() == [True, True, True, True, False, False, True, False, False]
    assert ic.pool_windows(5, 4).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    conv = ic.BinaryConv(conv_layer(4, 5, False, 1), first=False)
    plan = conv.plan(2, 3, 4, "cpu")
    assert plan.row_class.dtype == torch.uint8 and plan.row_class.shape == (24,)
    assert plan.thresholds.dtype == torch.int32 and plan.thresholds.shape == (9, 4)
    classes = plan.row_class.long()
    assert torch.equal(classes[:12], classes[12:]) and classes[5] == classes[6]
    assert len(set(classes[:12].tolist())) == 9
    interior = conv.threshold + conv.offset
    corner = conv.tap_sums[:, [0, 1, 2, 3, 6]].sum(1)      # pixel 0: top-left corner
    bottom = conv.tap_sums[:, [6, 7, 8]].sum(1)            # pixel 9: bottom edge
    assert torch.equal(plan.thresholds[classes[5]].long(), interior)
    assert torch.equal(plan.thresholds[classes[0]].long(), interior - corner)
    assert torch.equal(plan.thresholds[classes[9]].long(), interior - bottom)


# ---------------------------------------------------------------------------
# Whole networks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("filters,units,size", [((8, 13, 16, 33, 40, 70), 50, 32),
                                                ((64, 64, 128, 128, 130, 65), 100, 20),
                                                ((5, 6, 7, 8, 9, 10), 11, 9)])
def test_network_scores_match_float_path(filters, units, size):
    """Scores equal, not only predictions: the 1-bit network's hidden
    activations are the float path's, and the output layer is the same
    float arithmetic on the same integers.  Sizes 20 and 9: odd maps (5, 2)."""
    net = trained_like(random_net(filters, units, size, seed=size), random_pixels(200, size, size, 1))
    pixels = random_pixels(130, size, size, 2)      # more than one batch of the 1-bit network
    float_scores = cn.FloatConvNet(net)(pixels)
    xnor = ic.XnorConvNet(net)
    assert torch.equal(xnor(pixels), float_scores)
    assert torch.equal(xnor(pixels[:3]), float_scores[:3])     # another batch size: other tables


def trained_model(filters, units, seed=0):
    """cifar10.build_model with batch norm statistics of one batch of random
    images (alpha = 1: the moving averages become that batch's), random
    gamma (some 0 and < 0) and beta."""
    torch.manual_seed(seed)
    model = cifar10.build_model(filters, units, alpha=1.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, binary_net.BatchNorm):
                m.weight.normal_(1, 0.5)
                m.bias.normal_(0, 0.3)
                m.weight[:2] = torch.tensor([0.0, -1.0])
        model.train()
        model(binary_net.scale_pixels(random_pixels(200, 32, 32, seed)))
    return model.eval()


def test_float_path_predicts_as_the_trained_model():
    """The float path (exact integer accumulators) against the training
    code's network in eval mode on the same parameters: the model scales
    pixels to 2 p / 255 - 1 and adds the bias inside the convolution, so
    scores differ by rounding; predictions may differ at most twice."""
    model = trained_model((16, 16, 32, 32, 64, 64), 64)
    net = cn.convnet_from_arrays(binary_net.state_to_numpy(model), "model")
    pixels = random_pixels(400, 32, 32, 5)
    with torch.no_grad():
        theirs = model(binary_net.scale_pixels(pixels))
    ours = cn.FloatConvNet(net)(pixels)
    assert (theirs.argmax(1) != ours.argmax(1)).sum() <= 2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)
    assert torch.equal(ic.XnorConvNet(net)(pixels), ours)


def test_model_size():
    """The paper's CIFAR-10 network: every float32 parameter and statistic
    against packed weights and one threshold a unit: over 30x smaller."""
    model = trained_model(cifar10.recipe["filters"], 1024)
    net = cn.convnet_from_arrays(binary_net.state_to_numpy(model), "m")
    assert net.float_bytes() == 4 * sum(t.numel() for t in model.state_dict().values())
    assert net.float_bytes() / ic.XnorConvNet(net).size_bytes() > 30


@needs_cuda
def test_cuda_network_matches_cpu():
    net = trained_like(random_net((8, 13, 16, 33, 40, 70), 50, 32), random_pixels(200, 32, 32, 1))
    pixels = random_pixels(120, 32, 32, 3)
    cpu_scores = ic.XnorConvNet(net)(pixels)
    cuda_net = net.to("cuda")
    assert torch.equal(ic.XnorConvNet(cuda_net)(pixels.cuda()).cpu(), cpu_scores)
    assert torch.equal(cn.FloatConvNet(cuda_net)(pixels.cuda()).cpu(), cn.FloatConvNet(net)(pixels))


# ---------------------------------------------------------------------------
# Parameter files
# ---------------------------------------------------------------------------

def good_arrays():
    return binary_net.state_to_numpy(trained_model((8, 8, 16, 16, 16, 16), 32))


@pytest.mark.parametrize("change,words", [
    (lambda a: a.pop("bn5.running_inv_std"), "missing: bn5.running_inv_std"),
    (lambda a: a.update({"conv7.weight": a["conv1.weight"]}), "unexpected: conv7.weight"),
    (lambda a: a.update({"conv3.weight": np.zeros((16, 9, 3, 3), np.float32)}), "conv3.weight has shape"),
    (lambda a: a.update({"bn2.bias": np.zeros(5, np.float32)}), "bn2.bias has shape"),
    (lambda a: a.update({"dense1.weight": np.zeros((32, 100), np.float32)}), "dense1.weight has shape"),
    (lambda a: a.update({"conv1.bias": np.zeros(8, np.int32)}), "dtype"),
])
def test_bad_parameters_are_one_line_errors(change, words):
    arrays = good_arrays()
    change(arrays)
    with pytest.raises(infer.ParameterError) as info:
        cn.convnet_from_arrays(arrays, "p.npz")
    assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# --infer end to end: models trained one tiny epoch on files in the real formats
# ---------------------------------------------------------------------------

def write_data(folder, dataset, n_test):
    """Files as the data sets publish them (tests/test_datasets.py's writers),
    with random test images."""
    from test_datasets import cifar_batch, cifar_members, cifar_pickle, write_cifar_tar, write_svhn
    rng = np.random.default_rng(0)
    if dataset == "cifar10":
        members = cifar_members(per_batch=1100, n_test=n_test)
        test = cifar_batch(60000, n_test) | {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)}
        members["test_batch"] = cifar_pickle(test)
        write_cifar_tar(folder / "cifar-10-python.tar.gz", members)
    else:
        per_class = n_test // 10
        write_svhn(folder, test=per_class,
                   override={"test": {"X": rng.integers(0, 256, (32, 32, 3, 10 * per_class), dtype=np.uint8)}})
    return folder


@pytest.fixture(scope="module", params=["cifar10", "svhn"])
def trained(request, tmp_path_factory):
    """(dataset, data folder, .npz) after one epoch of the script on 20 images."""
    import subprocess
    import sys
    dataset, folder = request.param, tmp_path_factory.mktemp(request.param)
    data = write_data(folder / "data", dataset, n_test=60)
    npz = folder / "p.npz"
    r = subprocess.run([sys.executable, str(ROOT / f"{dataset}.py"), "--epochs", "1", "--limit", "20",
                        "--batch-size", "10", "--hidden-units", "64", "--data-dir", str(data),
                        "--save-path", str(npz), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return dataset, data, npz


@pytest.mark.filterwarnings("ignore:.*using it anyway")    # the files' checksums are not the published ones
def test_infer_recognises_the_network_and_predicts_identically(trained, tmp_path, capsys):
    dataset, data, npz = trained
    out = tmp_path / "infer.json"
    assert bo.main(["--infer", str(npz), "--data-dir", str(data), "--limit", "50", "--device", "cpu",
                    "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"float_err", "xnor_err", "identical", "float_ms", "xnor_ms", "bytes_32bit", "bytes_1bit",
            "dataset", "images"} <= set(result)
    assert result["dataset"] == dataset and result["images"] == 50
    assert result["identical"] is True and result["float_err"] == result["xnor_err"]
    assert result["bytes_1bit"] < result["bytes_32bit"] / 25
    printed = capsys.readouterr().out
    assert f"{infer.TITLES[dataset]} test set: 50 images" in printed and "predictions identical: yes" in printed


@pytest.mark.filterwarnings("ignore:.*using it anyway")
def test_infer_bad_files_are_one_line_errors(trained, tmp_path, capsys):
    _, data, npz = trained
    truncated, unknown = tmp_path / "truncated.npz", tmp_path / "unknown.npz"
    truncated.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    np.savez(unknown, **{"layer1.weight": np.zeros((3, 3), np.float32)})
    arrays = dict(np.load(npz))
    odd = tmp_path / "odd.npz"
    np.savez(odd, **(arrays | {"conv1.weight": arrays["conv1.weight"][:5], "conv1.bias": arrays["conv1.bias"][:5],
                               "conv2.weight": arrays["conv2.weight"][:, :5]}
                      | {f"bn1.{p}": arrays[f"bn1.{p}"][:5] for p in infer.BN_KEYS}))
    for path, extra, words in [(truncated, [], "not a .npz"), (unknown, [], "no network"),
                               (odd, [], "--dataset"), (npz, ["--dataset", "mnist"], "ConvNet")]:
        assert bo.main(["--infer", str(path), "--data-dir", str(data), "--limit", "5", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("binary_ops: error:") and err.count("\n") == 1 and words in err, err
