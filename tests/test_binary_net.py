"""binary_net.py against hand-computed values and plain re-computations of the paper."""
import json
import math

import numpy as np
import pytest
import torch

import binary_net as bn


def test_hard_sigmoid():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert bn.hard_sigmoid(x).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]


def test_sign_maps_zero_to_plus_one():
    x = torch.tensor([-2.0, -1e-45, -0.0, 0.0, 1e-45, 3.0])
    assert bn.sign(x).tolist() == [-1, -1, 1, 1, 1, 1]


def test_binary_tanh_unit_forward_and_straight_through_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0001, 3.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    y = bn.binary_tanh_unit(x)
    y.backward(g)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    # g * 1{|x| <= 1}: passed at |x| <= 1 (both ends included), cancelled beyond
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 0, 0]


def test_binarized_weight_gradient_reaches_real_weights_unchanged():
    W = torch.tensor([[-3.0, -0.2], [0.0, 0.7]], requires_grad=True)
    x = torch.tensor([[1.0, 2.0]])
    Wb = bn.binarization(W, 1.0)
    assert Wb.tolist() == [[-1, -1], [1, 1]]
    (x @ Wb.t()).sum().backward()
    # d/dWb of sum(x Wb^T) is x for every row, applied to W unchanged, even where |W| > 1
    assert W.grad.tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert bn.binarization(W, 0.5).abs().unique().tolist() == [0.5]
    assert bn.binarization(W, 1.0, binary=False) is W


def test_dense_layer_init_and_binary_forward():
    torch.manual_seed(0)
    layer = bn.DenseLayer(784, 4096, H=1.0)
    assert layer.weight.abs().max() <= 1 and layer.weight.min() < -0.99
    assert torch.all(layer.bias == 0)
    x = torch.randn(3, 784)
    expected = x @ bn.sign(layer.weight).t() + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-3)


def test_glorot_scales_of_the_mnist_mlp():
    # the values the recipe gives for 784-4096-4096-4096-10
    scales = [bn.glorot_scale(a, b) for a, b in [(784, 4096), (4096, 4096), (4096, 4096), (4096, 10)]]
    assert [round(s, 2) for s in scales] == [57.04, 73.90, 73.90, 52.32]
    conv = bn.Conv2DLayer(3, 128)
    assert conv.W_LR_scale == pytest.approx(1 / math.sqrt(1.5 / (3 * 9 + 128 * 9)))


def test_one_update_step_equals_the_reference_rule():
    """Adam on every parameter, the binary weights' step scaled by W_LR_scale, then
    clipped to [-H, H]: recomputed by hand in float64 over three steps."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(bn.DenseLayer(5, 4, H=1.0), torch.nn.BatchNorm1d(4))
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(0.9999 * bn.sign(layer.weight))  # steps push half of them past H
        layer.bias.uniform_(-1, 1)
    lr, b1, b2, eps = 0.003, 0.9, 0.999, 1e-8
    opt = bn.clipping_scaling(model, lr)
    params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    clipped = 0
    for t in range(1, 4):
        loss = bn.squared_hinge_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters()}
        opt.step()
        bn.clip_weights(model)
        for n in params:
            m[n] = b1 * m[n] + (1 - b1) * grads[n]
            v[n] = b2 * v[n] + (1 - b2) * grads[n] ** 2
            step = lr * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps)
            if n == "0.weight":
                unclipped = params[n] - layer.W_LR_scale * step
                clipped += (unclipped.abs() > 1).sum().item()
                params[n] = unclipped.clamp(-1, 1)
            else:
                params[n] = params[n] - step
        for n, p in model.named_parameters():
            assert torch.allclose(p.double(), params[n], rtol=1e-5, atol=1e-6), n
    assert clipped > 0  # the clip was exercised


def test_lr_schedule_decays_from_start_to_fin():
    decay = bn.lr_decay(0.003, 3e-7, 1000)
    assert 0.003 * decay ** 1000 == pytest.approx(3e-7, rel=1e-9)
    assert decay == pytest.approx(10 ** (-4 / 1000))


def test_squared_hinge_loss_by_hand():
    out = torch.tensor([[0.5, -2.0, 1.5], [0.0, 0.0, -1.0]])
    target = torch.tensor([0, 2])
    # t = [[1,-1,-1],[-1,-1,1]]; max(0, 1 - t*y)^2 = [[.25, 0, 6.25], [1, 1, 4]]
    assert bn.squared_hinge_loss(out, target).item() == pytest.approx((0.25 + 6.25 + 1 + 1 + 4) / 6)


def _tiny_data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = (X.float().mean((1, 2, 3)) > 127.5).long() + 2 * (X[:, 0, 0, 0] > 127).long()
    return {"train": (X[:160], y[:160]), "valid": (X[160:200], y[160:200]), "test": (X[200:], y[200:])}


def _tiny_run(tmp_path, name, num_epochs, log=print, resume=False):
    import mnist
    torch.manual_seed(0)
    model = mnist.build_model(32)
    opt = bn.clipping_scaling(model, 0.003)
    return bn.train(model, opt, _tiny_data(), 20, 0.003, 3e-7, num_epochs,
                    save_path=tmp_path / f"{name}.npz", checkpoint_path=tmp_path / f"{name}.ckpt",
                    metrics_path=tmp_path / f"{name}.jsonl", resume=resume, progress=False, log=log)


def test_resume_after_interruption_ends_with_the_same_numbers(tmp_path):
    full = _tiny_run(tmp_path, "full", 3)

    def killed_in_epoch_2(line):
        if line.startswith("Epoch 2 of"):  # epoch 2 trained, its checkpoint not yet written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path, "cut", 3, log=killed_in_epoch_2)
    resumed = _tiny_run(tmp_path, "cut", 3, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]
    assert strip(resumed) == strip(full)
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "cut.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    lines = (tmp_path / "cut.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / "cut.png").stat().st_size > 0


def test_saved_parameters_are_named_arrays_numpy_opens(tmp_path):
    _tiny_run(tmp_path, "p", 1)
    with np.load(tmp_path / "p.npz") as f:
        names = set(f.files)
        assert {"dense1.weight", "dense1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean",
                "bn1.running_inv_std", "dense4.weight", "bn4.running_inv_std"} <= names
        assert not any(k.endswith("running_var") for k in names)
        assert f["dense1.weight"].shape == (32, 784) and f["dense4.weight"].shape == (10, 32)
        assert np.abs(f["dense2.weight"]).max() <= 1.0


def test_model_summary_counts_binarized_parameters():
    import mnist
    text = bn.model_summary(mnist.build_model(4096))
    # 784*4096 + 2*4096*4096 + 4096*10 binarized weights
    assert f"{784 * 4096 + 2 * 4096 * 4096 + 4096 * 10:,}" in text


def test_reused_binary_weight_buffer_never_feeds_a_stale_backward():
    """Layers write Wb into one buffer per step; a second forward before the first
    one's backward must fail loudly (autograd's version check), never silently."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(bn.DenseLayer(6, 5), bn.BinaryTanh(), bn.DenseLayer(5, 3))
    x = torch.randn(4, 6)
    model(x).sum().backward()  # the ordinary step works
    first = model(x).sum()
    with torch.no_grad():
        model[2].weight.neg_()
    second = model(x).sum()
    with pytest.raises(RuntimeError, match="modified inplace"):
        (first + second).backward()


def test_checkpoint_with_pytorch_running_var_is_a_one_line_error(tmp_path):
    """A checkpoint written before batch norm kept Lasagne's inv_std cannot be resumed."""
    _tiny_run(tmp_path, "old", 1)
    ckpt = torch.load(tmp_path / "old.ckpt", weights_only=False)
    ckpt["model"] = {k.replace("running_inv_std", "running_var"): v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(bn.CheckpointError) as e:
        _tiny_run(tmp_path, "old", 2, resume=True)
    assert "running_var" in str(e.value) and "delete it" in str(e.value) and "\n" not in str(e.value)


def _cadence_run(tmp_path, name, log=print, resume=False):
    import mnist
    torch.manual_seed(0)
    model = mnist.build_model(32)
    return bn.train(model, bn.clipping_scaling(model, 0.003), _tiny_data(), 20, 0.003, 3e-7, 4,
                    save_path=tmp_path / f"{name}.npz", checkpoint_path=tmp_path / f"{name}.ckpt",
                    metrics_path=tmp_path / f"{name}.jsonl", resume=resume, progress=False, log=log,
                    checkpoint_every=1e9)


def _killed_at(epoch, exception):
    def log(line):
        if line.startswith(f"Epoch {epoch} of"):  # that epoch trained, its row not yet written
            raise exception
    return log


_strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]


def test_ctrl_c_writes_the_last_finished_epoch_kept_in_memory(tmp_path):
    """With a cadence that never comes due, Ctrl-C in epoch 3 writes the state of epoch
    2 (kept in memory); --resume from it ends as the uninterrupted run."""
    full = _tiny_run(tmp_path, "full", 4)
    with pytest.raises(KeyboardInterrupt):
        _cadence_run(tmp_path, "cut", log=_killed_at(3, KeyboardInterrupt))
    assert torch.load(tmp_path / "cut.ckpt", weights_only=False)["epoch"] == 2
    assert _strip(_cadence_run(tmp_path, "cut", resume=True)) == _strip(full)
    assert torch.load(tmp_path / "cut.ckpt", weights_only=False)["epoch"] == 4  # always after the last


def test_epochs_after_the_checkpoint_are_run_again_without_duplicate_rows(tmp_path, monkeypatch):
    """A checkpoint after epoch 1 only, then a kill that writes nothing, in epoch 4: the
    metrics hold rows 1-3; --resume runs epochs 2-4 again and the file ends with one
    row an epoch, equal to the uninterrupted run's."""
    full = _tiny_run(tmp_path, "full", 4)
    due = iter([True] + [False] * 10)
    monkeypatch.setattr(bn, "checkpoint_due", lambda *_: next(due))
    with pytest.raises(SystemExit):  # not a KeyboardInterrupt: nothing is written, as with SIGKILL
        _cadence_run(tmp_path, "cut", log=_killed_at(4, SystemExit))
    assert torch.load(tmp_path / "cut.ckpt", weights_only=False)["epoch"] == 1
    assert len((tmp_path / "cut.jsonl").read_text().splitlines()) == 3
    assert _strip(_cadence_run(tmp_path, "cut", resume=True)) == _strip(full)
    rows = [json.loads(line) for line in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert _strip(rows) == _strip(full)


def test_checkpoint_cadence():
    assert bn.checkpoint_due(100.0, 0, now=100.0)
    assert not bn.checkpoint_due(100.0, 10, now=100.0 + 599.9)
    assert bn.checkpoint_due(100.0, 10, now=100.0 + 600.0)


def test_every_metrics_row_names_the_device(tmp_path):
    rows = _tiny_run(tmp_path, "d", 1)
    with open("/proc/cpuinfo") as f:  # Linux: the model name of the first processor
        name = [line.split(":")[1].strip() for line in f if line.startswith("model name")][0]
    assert rows[0]["device"] == f"cpu: {name}"
    assert json.loads((tmp_path / "d.jsonl").read_text())["device"] == f"cpu: {name}"


def test_set_lr_fills_a_tensor_lr_in_place():
    import cuda_step
    model = torch.nn.Sequential(bn.DenseLayer(6, 5), torch.nn.BatchNorm1d(5))
    opt = bn.clipping_scaling(model, 0.003)
    cuda_step.make_capturable(opt)
    lrs = [g["lr"] for g in opt.param_groups]
    bn.set_lr(opt, 0.001)
    assert [g["lr"] for g in opt.param_groups] == lrs  # the same tensors, filled
    assert [g["lr"].item() for g in opt.param_groups] == [0.001 * model[0].W_LR_scale, 0.001]
    assert all(g["capturable"] for g in opt.param_groups)
