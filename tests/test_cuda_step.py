"""cuda_step.FastStep against the plain loop (binary_net.train_epoch / train)."""
import pytest
import torch

import binary_net as bn
import cuda_step
import mnist


def _data(n, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return X.to(device), y.to(device)


def _model_and_optimizer(device, units=32, dropout=True):
    torch.manual_seed(0)
    model = mnist.build_model(units).to(device)
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model, bn.clipping_scaling(model, 0.003)


def _state(model, optimizer):
    return [t.detach().cpu().clone() for t in model.state_dict().values()] + \
           [t.cpu().clone() for s in optimizer.state.values() for t in s.values()]


def test_fast_step_on_the_cpu_equals_the_plain_epochs_exactly():
    """The same step without the graph, after warm-up steps that it undoes: the same
    shuffles, dropout masks, losses, weights, batch-norm statistics and Adam state."""
    X, y = _data(200)
    plain, fast = _model_and_optimizer("cpu"), _model_and_optimizer("cpu")
    step = cuda_step.FastStep(*fast, X, y, 20)
    step.warm_up()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.manual_seed(7)
    losses_plain = []
    for lr in (0.003, 0.002):
        bn.set_lr(plain[1], lr)
        losses_plain.append(bn.train_epoch(*plain, X, y, 20, g1, progress=False))
    torch.manual_seed(7)
    losses_fast = []
    for lr in (0.003, 0.002):
        bn.set_lr(fast[1], lr)
        losses_fast.append(step.epoch(g2))
    assert losses_fast == losses_plain
    for a, b in zip(_state(*plain), _state(*fast)):
        assert torch.equal(a, b)


def test_train_with_the_fast_step_on_the_cpu_gives_the_plain_history(tmp_path):
    """train(fast_step=True) on the CPU, interrupted in epoch 2 and resumed (tensor LRs
    in its checkpoint), ends with the plain run's numbers, evaluation included."""
    X, y = _data(240)
    data = {"train": (X[:160], y[:160]), "valid": (X[160:200], y[160:200]), "test": (X[200:], y[200:])}

    def run(name, fast, log=lambda _: None, resume=False):
        model, opt = _model_and_optimizer("cpu")
        return bn.train(model, opt, data, 20, 0.003, 3e-7, 3, progress=False, fast_step=fast, resume=resume,
                        checkpoint_path=tmp_path / f"{name}.ckpt", log=log)

    def killed_in_epoch_2(line):
        if line.startswith("Epoch 2 of"):
            raise KeyboardInterrupt

    plain = run("plain", False)
    with pytest.raises(KeyboardInterrupt):
        run("fast", True, log=killed_in_epoch_2)
    fast = run("fast", True, resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]
    assert strip(fast) == strip(plain)


def test_warm_up_leaves_a_fresh_optimizer_as_it_found_it():
    X, y = _data(100)
    model, opt = _model_and_optimizer("cpu")
    before = [t.clone() for t in model.state_dict().values()]
    rng = torch.get_rng_state()
    cuda_step.FastStep(model, opt, X, y, 20).warm_up()
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.count_nonzero(t) == 0 for s in opt.state.values() for t in s.values())


def test_the_fast_step_refuses_another_optimizer():
    model = mnist.build_model(8)
    with pytest.raises(ValueError, match="Adam only"):
        cuda_step.make_capturable(bn.clipping_scaling(model, 0.003, "shift-adamax"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dropout", [False, True])
def test_the_cuda_graph_step_equals_the_eager_step(dropout):
    """40 steps of the graph against the eager step on CUDA from the same CUDA RNG state
    (the graph-safe philox generator gives a replay the eager step's dropout masks;
    dropout=False checks the rest apart from the masks): the same losses and weights
    within float tolerance. The eager optimizer is made capturable as well: CUDA's fused
    Adam reads a tensor LR as float32 and a Python LR as a double, and a weight nudged
    across zero by that last bit flips its sign, so only the same LR keeps 40 steps of
    a binarized network comparable."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    X, y = _data(800, "cuda")
    plain, fast = _model_and_optimizer("cuda", 256, dropout), _model_and_optimizer("cuda", 256, dropout)
    torch.cuda.manual_seed(11)
    step = cuda_step.FastStep(*fast, X, y, 20)
    assert step.graph is not None
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(5))
    step.order.copy_(order)
    step.step_index.zero_()
    losses_fast, losses_plain = [], []
    for _ in range(40):
        step.loss_sum.zero_()
        step.graph.replay()
        losses_fast.append(step.loss_sum.item())
    torch.cuda.manual_seed(11)
    cuda_step.make_capturable(plain[1])
    plain[0].train()
    order = order.cuda()
    for i in range(40):
        idx = order[i * 20:(i + 1) * 20]
        losses_plain.append(bn.train_step(*plain, X[idx], y[idx]).item())
    assert losses_fast == pytest.approx(losses_plain, rel=1e-4, abs=1e-5)
    for a, b in zip(_state(*plain), _state(*fast)):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5)
