"""BinaryNet: training deep networks with weights and activations constrained to +1 or -1.

The machinery of Courbariaux, Hubara, Soudry, El-Yaniv and Bengio (2016,
arXiv 1602.02830), named as the authors' reference code (binary_net.py) names it:

  hard_sigmoid, binarization, binary_tanh_unit    Section 1.1-1.3 of the paper
  DenseLayer, Conv2DLayer                         binarized weights, real biases
  clipping_scaling                                Algorithm 1: Adam, Glorot scale, clip
  squared_hinge_loss                              the loss of the reference scripts
  train                                           the reference training loop

plus the paper's hardware-friendly variants (Section 1.4-1.5: shift-based batch
normalization and shift-based AdaMax) and `main`, the command line that every
benchmark script (mnist.py, cifar10.py, svhn.py) shares.
"""
import argparse
import copy
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

# Large tensors on transparent huge pages: each step allocates 64 MB weight and gradient
# matrices, whose 4 KiB page faults otherwise cost about a third of the time spent
# writing them. torch's CPU allocator reads THP_MEM_ALLOC_ENABLE once, at its first
# allocation (measured on torch 2.13: set after `import torch` it still works, set
# after the first tensor it is ignored). So a script imports binary_net before it makes
# a tensor, which an import at the top does; setting it here, above `import torch`,
# keeps that true whatever is imported first. `THP_MEM_ALLOC_ENABLE=0` turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Binarization (paper Section 1.1-1.3)


def hard_sigmoid(x):
    """hard_sigmoid(x) = clip((x + 1) / 2, 0, 1), the paper's Eq. 3."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def sign(x, out=None):
    """sign(x) in {-1, +1} with sign(0) = +1 (-0.0 included): the one convention of the
    whole project. Computed as 1 - 2 * [x < 0] in two vectorized passes over one buffer:
    torch.where takes several times longer on the 16M-element weight matrices."""
    out = torch.lt(x, 0, out=torch.empty_like(x) if out is None else out)
    return torch.sub(out.new_ones(()), out, alpha=2, out=out)


class _BinaryTanh(torch.autograd.Function):
    """Forward sign(x); backward the straight-through estimator g * 1{|x| <= 1} (Eq. 4)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


def binary_tanh_unit(x):
    """The binary activation: 2 * round(hard_sigmoid(x)) - 1, i.e. sign(x) with its STE.

    This is the only place a gradient is cancelled (where |x| > 1)."""
    return _BinaryTanh.apply(x)


class BinaryTanh(nn.Module):
    """binary_tanh_unit as a layer (the reference's NonlinearityLayer)."""

    def forward(self, x):
        return binary_tanh_unit(x)


class _Binarize(torch.autograd.Function):
    """Wb in {-H, +H}; backward: the gradient w.r.t. Wb is applied to the real W unchanged.

    No 1{|w| <= 1} factor here: the clipping of the update rule does that job."""

    @staticmethod
    def forward(ctx, W, H, stochastic, out):
        out = torch.empty_like(W) if out is None else out
        if stochastic:  # +H with probability hard_sigmoid(W / H)
            out = torch.lt(torch.rand_like(W), hard_sigmoid(W / H), out=out).mul_(2 * H).sub_(H)
        else:
            out = sign(W, out=out) if H == 1 else sign(W, out=out).mul_(H)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None


def binarization(W, H, binary=True, deterministic=False, stochastic=False, out=None):
    """Binarize the real weights W to Wb in {-H, +H} (paper Eq. 1 and 2).

    Deterministic: Wb = H * sign(W). Stochastic: Wb = +H with probability
    hard_sigmoid(W / H), else -H. As in the reference, `deterministic` means evaluation:
    a stochastic model is then evaluated with its real-valued weights. `out`: a buffer
    for Wb, reused from step to step by the layers (see _BinaryWeights)."""
    if not binary or (deterministic and stochastic):
        return W
    return _Binarize.apply(W, H, stochastic, out)


# ---------------------------------------------------------------------------
# Binary layers


def glorot_scale(fan_in, fan_out):
    """W_LR_scale = 1 / sqrt(1.5 / (fan_in + fan_out)): the per-layer "Glorot" step scale."""
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


class _BinaryWeights:
    """What DenseLayer and Conv2DLayer share: H, W_LR_scale, Uniform(-H, H) init.

    With binary=False the layer is a plain float layer (the reference's switch, used
    here for the float twin of a network that --bench-step times)."""

    def _setup_binary(self, binary, stochastic, H, W_LR_scale, fan_in, fan_out):
        self.binary, self.stochastic, self.H = binary, stochastic, H
        self._Wb = None  # the Wb buffer, made at the first binary forward
        self.W_LR_scale = glorot_scale(fan_in, fan_out) if W_LR_scale == "Glorot" else W_LR_scale
        if binary:
            with torch.no_grad():
                self.weight.uniform_(-H, H)
                self.bias.zero_()  # biases are never binarized; Lasagne's default init is 0

    def binary_weight(self):
        # Wb is written into one buffer per layer, reused every step: a new 64 MB tensor
        # per step costs more in page faults than computing it. Autograd's version
        # counter still guards it: a backward through a graph whose Wb has since been
        # overwritten by another forward raises an error instead of using the newer Wb.
        W = self.weight
        kind = (W.shape, W.device, W.dtype)
        if self.binary and (self._Wb is None or (self._Wb.shape, self._Wb.device, self._Wb.dtype) != kind):
            self._Wb = torch.empty_like(W)
        return binarization(W, self.H, self.binary, deterministic=not self.training,
                            stochastic=self.stochastic, out=self._Wb)


class DenseLayer(nn.Linear, _BinaryWeights):
    """A fully connected layer with binarized weights and a real bias."""

    def __init__(self, in_features, out_features, binary=True, stochastic=False, H=1.0, W_LR_scale="Glorot"):
        super().__init__(in_features, out_features)
        self._setup_binary(binary, stochastic, H, W_LR_scale, in_features, out_features)

    def forward(self, x):
        return F.linear(x.flatten(1), self.binary_weight(), self.bias)


class Conv2DLayer(nn.Conv2d, _BinaryWeights):
    """A 3x3, stride-1, padded-by-1 convolution with binarized weights and a real bias."""

    def __init__(self, in_channels, out_channels, binary=True, stochastic=False, H=1.0, W_LR_scale="Glorot",
                 kernel_size=3, padding=1):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        fan_in, fan_out = (c * self.kernel_size[0] * self.kernel_size[1] for c in (in_channels, out_channels))
        self._setup_binary(binary, stochastic, H, W_LR_scale, fan_in, fan_out)

    def forward(self, x):
        return self._conv_forward(x, self.binary_weight(), self.bias)


def binary_layers(model):
    return [m for m in model.modules() if isinstance(m, _BinaryWeights) and m.binary]


def activation(binary):
    """binary_tanh_unit for a BNN; hard tanh, its float counterpart, for the float twin."""
    return BinaryTanh() if binary else nn.Hardtanh()


# ---------------------------------------------------------------------------
# Batch normalization: Lasagne's BatchNormLayer, and the paper's shift-based one (Algorithm 3)

BN_EPSILON = 1e-4
BN_ALPHA = 0.1  # moving averages: new = (1 - alpha) * old + alpha * batch


class BatchNorm(nn.Module):
    """Batch normalization as Lasagne's BatchNormLayer computes it (Ioffe & Szegedy 2015).

    Training: normalize by the batch mean and the biased batch variance + epsilon, over
    the batch for dense layers and over batch and space for conv layers (any input of
    2 or more dims: features on dim 1). Moving averages of the mean and of
    inv_std = 1 / sqrt(var + epsilon), with factor alpha, from 0 and 1.
    Evaluation: y = (x - mean) * (gamma * inv_std) + beta with the moving averages.

    Not nn.BatchNorm: that one averages the unbiased variance and takes 1/sqrt of the
    average at evaluation, a scale about 1.3% smaller at batch 100 (Bessel and Jensen),
    and the moving statistics set every hidden unit's sign at test time.
    state_dict: weight (gamma), bias (beta), running_mean, running_inv_std."""

    def __init__(self, num_features, epsilon=BN_EPSILON, alpha=BN_ALPHA):
        super().__init__()
        self.epsilon, self.alpha = epsilon, alpha
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_inv_std", torch.ones(num_features))

    def extra_repr(self):
        return f"{self.weight.numel()}, epsilon={self.epsilon}, alpha={self.alpha}"

    def batch_statistics(self, x, dims):
        """The batch mean and inv_std = 1 / sqrt(biased variance + epsilon)."""
        var, mean = torch.var_mean(x, dims, correction=0)
        return mean, torch.rsqrt(var + self.epsilon)

    def scale(self, inv_std):
        """The factor that multiplies x - mean: gamma * inv_std."""
        return self.weight * inv_std

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))  # per feature: over the batch (and space)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean, inv_std = self.batch_statistics(x, dims)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.alpha)
                self.running_inv_std.lerp_(inv_std, self.alpha)
        else:
            mean, inv_std = self.running_mean, self.running_inv_std
        return (x - mean.view(shape)) * self.scale(inv_std).view(shape) + self.bias.view(shape)


class _AP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.sign(x) * torch.exp2(torch.round(torch.log2(x.abs())))

    @staticmethod
    def backward(ctx, g):
        return g


def ap2(x):
    """AP2(x) = sign(x) * 2^round(log2|x|): the power of two nearest x in log2.

    Multiplying by AP2(x) is a bit shift. AP2(0) = 0. The gradient passes straight
    through the rounding, as through binarization."""
    return _AP2.apply(x)


class ShiftBatchNorm(BatchNorm):
    """Shift-based batch normalization (paper Algorithm 3).

    C = x - mean; var = mean(C * AP2(C)); xhat = C * AP2(1 / sqrt(var + eps));
    y = AP2(gamma) * xhat + beta. Its statistics are kept as BatchNorm keeps them: moving
    averages of the mean and of inv_std = 1 / sqrt(var + eps), read at evaluation, where
    the shift AP2(inv_std) is taken of the averaged inv_std (Algorithm 3 names no moving
    statistic; rounding after averaging keeps the stored state the same as BatchNorm's)."""

    def batch_statistics(self, x, dims):
        mean = x.mean(dims, keepdim=True)
        C = x - mean
        var = (C * ap2(C)).mean(dims)  # the shift-based variance of Algorithm 3
        return mean.flatten(), torch.rsqrt(var + self.epsilon)

    def scale(self, inv_std):
        return ap2(self.weight) * ap2(inv_std)


BATCH_NORMS = {"standard": BatchNorm, "shift": ShiftBatchNorm}


# ---------------------------------------------------------------------------
# The update rule (paper Algorithm 1) and the shift-based AdaMax (Algorithm 4)


class ShiftAdaMax(torch.optim.Optimizer):
    """Shift-based AdaMax (paper Algorithm 4): every multiplication by a power of two.

    m = b1 m + (1 - b1) g;  v = max(b2 v, |g|);
    theta -= AP2(lr * scale / (1 - b1^t)) * m * AP2(1 / v).
    Defaults lr = 2^-10, 1 - b1 = 2^-3, 1 - b2 = 2^-10. The per-group `scale` carries
    the Glorot scale of binarized weights, so that factor is a shift as well."""

    def __init__(self, params, lr=2.0 ** -10, betas=(1 - 2.0 ** -3, 1 - 2.0 ** -10), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, scale=1.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, g = state["m"], state["v"], p.grad
                m.lerp_(g, 1 - b1)
                torch.maximum(v.mul_(b2), g.abs(), out=v)
                rate = ap2(torch.tensor(group["lr"] * group["scale"] / (1 - b1 ** state["step"]))).item()
                # AP2(1 / v) for v > 0 is 2^-round(log2 v), computed in place
                inv_v = v.add(group["eps"]).log2_().round_().neg_().exp2_()
                p.addcmul_(m, inv_v, value=-rate)


def clipping_scaling(model, lr, optimizer="adam"):
    """The reference update rule (Algorithm 1), as one optimizer over every parameter.

    Adam (beta1 0.9, beta2 0.999, eps 1e-8) on all parameters; for each layer's
    binarized weights the step is scaled by the layer's W_LR_scale. Scaling Adam's
    step equals scaling the group's learning rate (eps sits inside the step), so each
    binary layer gets its own parameter group with `scale`. After every step, call
    `clip_weights` to clip binarized weights to [-H, H]."""
    binary = binary_layers(model)
    binary_ids = {id(m.weight) for m in binary}
    groups = [dict(params=[m.weight], scale=m.W_LR_scale) for m in binary]
    groups.append(dict(params=[p for p in model.parameters() if id(p) not in binary_ids], scale=1.0))
    if optimizer == "shift-adamax":
        opt = ShiftAdaMax(groups, lr=lr)
    else:
        # fused Adam is several times faster than the per-tensor loop on the CPU
        opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    set_lr(opt, lr)
    return opt


def set_lr(optimizer, lr):
    """The epoch's LR in every group. An LR held as a tensor (the CUDA graph's, see
    cuda_step.py) is filled in place: the graph reads it from its fixed address."""
    for group in optimizer.param_groups:
        value = lr if isinstance(optimizer, ShiftAdaMax) else lr * group["scale"]  # AdaMax rounds its scale itself
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


@torch.no_grad()
def clip_weights(model):
    for m in binary_layers(model):
        m.weight.clamp_(-m.H, m.H)


def lr_decay(lr_start, lr_fin, num_epochs):
    """The per-epoch factor: LR *= (LR_fin / LR_start) ** (1 / num_epochs)."""
    return (lr_fin / lr_start) ** (1.0 / num_epochs)


def squared_hinge_loss(output, target):
    """mean(max(0, 1 - t * y)^2) with t the one-hot target mapped to +-1."""
    t = 2.0 * F.one_hot(target, output.shape[1]).to(output.dtype) - 1.0
    return F.relu(1.0 - t * output).square().mean()


# ---------------------------------------------------------------------------
# The training loop (the reference binary_net.train)


def scale_pixels(X):
    """uint8 pixels to [-1, 1]: 2/255 * x - 1, done per batch so data stays uint8."""
    return X.float().mul_(2.0 / 255.0).sub_(1.0)


def train_step(model, optimizer, x, y):
    """One step of Algorithm 1: forward with binary weights, backward, update, clip."""
    loss = squared_hinge_loss(model(scale_pixels(x)), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    clip_weights(model)
    return loss.detach()


@torch.no_grad()
def evaluate(model, X, y, batch_size):
    """Mean loss and error rate (percent) over all of X, in evaluation mode."""
    model.eval()
    # summed on the device (in float64, as Python's floats summed them): one sync in all
    loss = torch.zeros((), dtype=torch.float64, device=X.device)
    errors = torch.zeros((), dtype=torch.int64, device=X.device)
    for i in range(0, len(X), batch_size):
        out = model(scale_pixels(X[i:i + batch_size]))
        loss += squared_hinge_loss(out, y[i:i + batch_size]).double() * len(out)
        errors += (out.argmax(1) != y[i:i + batch_size]).sum()
    return loss.item() / len(X), 100.0 * errors.item() / len(X)


def train_epoch(model, optimizer, X, y, batch_size, generator, progress):
    """One pass over the shuffled training set, full batches only (as the reference)."""
    model.train()
    order = torch.randperm(len(X), generator=generator).to(X.device)
    batches = len(X) // batch_size
    total = torch.zeros((), device=X.device)
    bar = _progress(batches, progress)
    for i in range(batches):
        idx = order[i * batch_size:(i + 1) * batch_size]
        total += train_step(model, optimizer, X[idx], y[idx])
        if bar is not None and (i % 10 == 9 or i == batches - 1):
            bar.set_postfix(loss=f"{total.item() / (i + 1):.4f}", refresh=False)
            bar.update(i + 1 - bar.n)
    if bar is not None:
        bar.close()
    return total.item() / max(batches, 1)


def _progress(total, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="batch", leave=False, dynamic_ncols=True, disable=None)  # None: only on a terminal


def state_to_numpy(model):
    """The model's tensors as named float32 arrays (state_dict names), for an .npz."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def _atomic_save(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_parameters(model, path):
    """The parameters as an .npz that numpy alone opens, one array per tensor."""
    _atomic_save(path, lambda f: np.savez(f, **state_to_numpy(model)))


def cpu_name():
    """The CPU's model name ("AMD EPYC 9454"): /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return model or platform.processor() or platform.machine() or "unknown"


def device_name(device):
    """The device in words, for the metrics: "cuda: NVIDIA H200", "cpu: AMD EPYC 9454"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {cpu_name()}"


def train(model, optimizer, data, batch_size, LR_start, LR_fin, num_epochs, save_path=None,
          checkpoint_path=None, metrics_path=None, resume=False, seed=0, progress=True,
          log=print, checkpoint_every=0, fast_step=False, eval_batch_size=None):
    """The reference training loop (binary_net.train).

    Shuffle every epoch; train on full batches; evaluate validation; when
    val_err <= best, record the epoch, evaluate test and save the parameters; decay the
    LR once per epoch. The whole training state is written atomically to
    `checkpoint_path` when `checkpoint_every` minutes have passed since the last write
    (0: every epoch), after the last epoch, and on KeyboardInterrupt (the state of the
    last finished epoch, kept in memory; the interrupt is then raised again). From it
    `resume=True` continues exactly. `fast_step`: train through cuda_step.FastStep (one
    CUDA graph a step); `eval_batch_size`: the batch of evaluation (default batch_size).
    `data` maps 'train', 'valid', 'test' to (X uint8, y int64) tensors on the device.
    Returns the list of per-epoch metrics."""
    X_train, y_train = data["train"]
    generator = torch.Generator().manual_seed(seed)
    decay = lr_decay(LR_start, LR_fin, num_epochs)
    history, start = [], 0
    best = dict(best_epoch=0, best_val_err=100.0, test_loss=float("nan"), test_err=float("nan"))
    if resume and checkpoint_path and Path(checkpoint_path).exists():
        history, best, start = load_checkpoint(checkpoint_path, model, optimizer, generator)
        log(f"resumed from {checkpoint_path} after epoch {start}")
    elif resume:
        log(f"no checkpoint at {checkpoint_path}: starting from scratch")
    if metrics_path:  # rewrite what the checkpoint knows: rows of epochs after it are run again
        _atomic_save(metrics_path, lambda f: f.write("".join(json.dumps(h) + "\n" for h in history).encode()))
    if fast_step:  # after the checkpoint is loaded: the graph holds the addresses of its tensors
        import cuda_step
        fast_step = cuda_step.FastStep(model, optimizer, X_train, y_train, batch_size)
    eval_batch_size = eval_batch_size or batch_size
    device = device_name(X_train.device)
    state = lambda epoch: dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                               generator=generator.get_state(), rng=torch.get_rng_state(),
                               cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                               history=history, best=best, epoch=epoch)
    last_write, unsaved = time.monotonic(), None  # unsaved: a finished epoch's state not yet written
    try:
        for epoch in range(start, num_epochs):
            lr = LR_start * decay ** epoch
            set_lr(optimizer, lr)
            t0 = time.time()
            if fast_step:
                train_loss = fast_step.epoch(generator, progress)
            else:
                train_loss = train_epoch(model, optimizer, X_train, y_train, batch_size, generator, progress)
            train_seconds = time.time() - t0  # to the loss's read, which waits for the device
            val_loss, val_err = evaluate(model, *data["valid"], eval_batch_size)
            if val_err <= best["best_val_err"]:
                best["best_val_err"], best["best_epoch"] = val_err, epoch + 1
                best["test_loss"], best["test_err"] = evaluate(model, *data["test"], eval_batch_size)
                if save_path:
                    save_parameters(model, save_path)
            row = dict(epoch=epoch + 1, seconds=time.time() - t0, train_seconds=train_seconds, lr=lr,
                       train_loss=train_loss, val_loss=val_loss, val_err=val_err, **best, device=device)
            history.append(row)
            report_epoch(row, num_epochs, log)
            if metrics_path:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if not checkpoint_path:
                continue
            if epoch + 1 == num_epochs or checkpoint_due(last_write, checkpoint_every):
                save_checkpoint(checkpoint_path, state(epoch + 1))
                last_write, unsaved = time.monotonic(), None
                if metrics_path:
                    plot_history(history, Path(metrics_path).with_suffix(".png"))
            else:
                unsaved = copy.deepcopy(state(epoch + 1))  # a copy: the next steps change the tensors
    except KeyboardInterrupt:
        if unsaved is not None:
            save_checkpoint(checkpoint_path, unsaved)
        raise
    if metrics_path and not checkpoint_path:
        plot_history(history, Path(metrics_path).with_suffix(".png"))
    return history


def checkpoint_due(last_write, every_minutes, now=None):
    """Whether `every_minutes` have passed since the checkpoint written at `last_write`
    (time.monotonic() seconds); 0 minutes: always."""
    now = time.monotonic() if now is None else now
    return now - last_write >= 60.0 * every_minutes


def save_checkpoint(path, state):
    """The whole training state (train's `state`), written atomically: RNGs included, so
    a resumed run draws the same shuffles and dropout masks as an uninterrupted one."""
    _atomic_save(path, lambda f: torch.save(state, f))


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from; the message is one line."""


def load_checkpoint(path, model, optimizer, generator):
    """Restore what save_checkpoint wrote; returns (history, best, epoch).

    Each group keeps its own LR object and `capturable` flag (set each epoch, and by
    cuda_step for its graph), so that either step resumes from either one's checkpoint."""
    own = [{k: g[k] for k in ("lr", "capturable") if k in g} for g in optimizer.param_groups]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if any(k.endswith(".running_var") for k in ckpt["model"]):
            raise CheckpointError(f"cannot resume from {path}: it was written before batch norm kept Lasagne's "
                                  f"statistics (running_var, not running_inv_std); delete it to start afresh")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, kept in zip(optimizer.param_groups, own):
            group.update(kept)
    except CheckpointError:
        raise
    except Exception as e:  # torch.load and load_state_dict raise many kinds, all multi-line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot resume from {path}: {reason[:200]} (was it written with other flags? "
                              f"delete it to start afresh)") from e
    generator.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["history"], ckpt["best"], ckpt["epoch"]


def report_epoch(row, num_epochs, log=print):
    """The per-epoch report, as the reference code printed it."""
    log(f"Epoch {row['epoch']} of {num_epochs} took {row['seconds']:.2f}s")
    log(f"  LR:                            {row['lr']:.6g}")
    log(f"  training loss:                 {row['train_loss']:.6f}")
    log(f"  validation loss:               {row['val_loss']:.6f}")
    log(f"  validation error rate:         {row['val_err']:.2f}%")
    log(f"  best epoch:                    {row['best_epoch']}")
    log(f"  best validation error rate:    {row['best_val_err']:.2f}%")
    log(f"  test loss:                     {row['test_loss']:.6f}")
    log(f"  test error rate:               {row['test_err']:.2f}%")


def plot_history(history, path):
    """Training loss and validation/test error per epoch, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker=".", label="training")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
    ax1.set(xlabel="epoch", ylabel="squared hinge loss", title="loss")
    ax2.plot(epochs, [h["val_err"] for h in history], marker=".", label="validation")
    ax2.plot(epochs, [h["test_err"] for h in history], marker=".", label="test (at best validation)")
    ax2.set(xlabel="epoch", ylabel="error rate (%)", title="error")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Model summary


def model_summary(model):
    """A table: each layer with parameters, its parameter count, how many are binarized,
    and the model's size at 32 bits and with binarized weights packed at 1 bit."""
    rows, total, total_bin, binary = [], 0, 0, binary_layers(model)
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        n = sum(p.numel() for p in own)
        nb = m.weight.numel() if m in binary else 0
        rows.append(f"  {name:<12} {type(m).__name__:<16} {n:>12,} {nb:>12,}")
        total, total_bin = total + n, total_bin + nb
    bits32 = 4 * total
    bits1 = (total_bin + 7) // 8 + 4 * (total - total_bin)
    head = f"  {'layer':<12} {'type':<16} {'parameters':>12} {'binarized':>12}"
    return "\n".join([head, *rows, f"  {'total':<29} {total:>12,} {total_bin:>12,}",
                      f"  size: {bits32 / 2**20:.2f} MiB at 32 bits, "
                      f"{bits1 / 2**20:.2f} MiB with binary weights packed at 1 bit "
                      f"({bits32 / bits1:.1f}x smaller)"])


# ---------------------------------------------------------------------------
# The command line that every benchmark script shares


def parse_args(recipe, argv=None):
    """The flags of every benchmark script; defaults are the paper's recipe."""
    p = argparse.ArgumentParser(description=recipe["description"],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=recipe["num_epochs"],
                   help="epochs to run; the LR decays from LR_start to LR_fin over them")
    p.add_argument("--batch-size", type=int, default=recipe["batch_size"], help="examples per step")
    p.add_argument("--hidden-units", type=int, default=recipe["num_units"],
                   help="width of the fully connected hidden layers")
    p.add_argument("--data-dir", default=None, help="where the data files are (default: a per-user cache, "
                   "downloaded on first use)")
    p.add_argument("--save-path", default=recipe["save_path"], help="best-validation parameters (.npz)")
    p.add_argument("--metrics", default=None, help="per-epoch metrics as JSON lines (and a PNG plot beside)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --save-path")
    p.add_argument("--seed", type=int, default=0, help="seeds initialization, shuffling and dropout")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: CUDA when present")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each split")
    p.add_argument("--bn", choices=["standard", "shift"], default="standard",
                   help="batch normalization: standard, or the paper's shift-based one")
    p.add_argument("--optimizer", choices=["adam", "shift-adamax"], default="adam",
                   help="Adam, or the paper's shift-based AdaMax")
    p.add_argument("--stochastic", action="store_true", help="stochastic weight binarization")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint-every", type=float, default=10.0, metavar="MINUTES",
                   help="write the training state when this long has passed since the last write (0: every "
                   "epoch); always after the last epoch and on Ctrl-C")
    p.add_argument("--no-fast-step", action="store_true",
                   help="on CUDA, the plain eager step instead of one CUDA graph a step (cuda_step.py)")
    p.add_argument("--synthetic", action="store_true",
                   help="random pixels and labels in the real split sizes instead of the data, to time epochs")
    p.add_argument("--bench-step", type=int, default=0, metavar="N",
                   help="time N training steps of the BNN and of its float twin on random pixels, then exit")
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size", "hidden_units"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if not args.checkpoint_every >= 0:
        p.error("--checkpoint-every must be 0 or more minutes")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def bench_step(recipe, build_model, args, device):
    """Time one training step of the BNN against the same network in float.

    The float twin has binary=False layers, hard tanh activations and plain Adam (no
    scaling, no clipping). The two alternate step by step so that drift of the
    machine's speed falls on both; medians are reported."""
    x = torch.randint(0, 256, (args.batch_size, *recipe["input_shape"]), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    runs = {}
    for name, binary in (("binary", True), ("float", False)):
        model = build_model(args, binary=binary).to(device).train()
        runs[name] = (model, clipping_scaling(model, recipe["LR_start"], args.optimizer), [])
    for i in range(args.bench_step + 2):
        for model, opt, times in runs.values():
            t0 = time.perf_counter()
            train_step(model, opt, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
    med = {k: float(np.median(v[2])) for k, v in runs.items()}
    print(f"training step, batch {args.batch_size}, {args.bench_step} steps each, on {device}: "
          f"binary {1e3 * med['binary']:.1f} ms, float {1e3 * med['float']:.1f} ms, "
          f"ratio {med['binary'] / med['float']:.2f}")
    return med


FAST_EVAL_BATCH = 1000  # evaluation's batch with the fast step: in eval mode a batch's size changes no output


def synthetic_data(recipe, limit, device, seed):
    """Random pixels and labels on the device, in the recipe's split sizes (first `limit`
    of each): a step's time does not depend on the values, so epochs are timed on these."""
    g = torch.Generator(device).manual_seed(seed)
    data = {}
    for name, n in zip(("train", "valid", "test"), recipe["split_sizes"]):
        n = min(n, limit or n)
        X = torch.randint(0, 256, (n, *recipe["input_shape"]), generator=g, dtype=torch.uint8, device=device)
        data[name] = (X, torch.randint(0, 10, (n,), generator=g, device=device))
    return data


def main(recipe, build_model, load_data, argv=None):
    """Parse the flags, print the recipe, load the data, build the model, train.

    recipe: the benchmark's constants (printed at the start, as the reference did);
    build_model(args, binary=True) -> nn.Module; load_data(data_dir) -> {'train'|'valid'|'test': (X, y)}."""
    import datasets  # the data loaders (the role pylearn2 played for the reference)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    args = parse_args(recipe, argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # float32 throughout: cuDNN's convolutions would otherwise round their inputs to TF32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)
    if args.bench_step:
        return bench_step(recipe, build_model, args, device)
    fast = device.type == "cuda" and args.optimizer == "adam" and not args.no_fast_step
    constants = dict(recipe, save_path=args.save_path, num_epochs=args.epochs, batch_size=args.batch_size, num_units=args.hidden_units,
                     bn=args.bn, optimizer=args.optimizer, stochastic=args.stochastic, device=device_name(device),
                     fast_step=fast, tf32=False)
    constants.pop("description")
    for k, v in constants.items():
        print(f"{k} = {v}")
    if args.synthetic:
        data = synthetic_data(recipe, args.limit, device, args.seed)
    else:
        try:
            splits = load_data(args.data_dir)
        except datasets.DataError as e:
            sys.exit(f"error: {e}")
        data = {}
        for name, (X, y) in splits.items():
            X, y = X[:args.limit], y[:args.limit]
            data[name] = (torch.from_numpy(np.require(X, requirements=["C", "W"])).to(device),
                          torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device))
    if len(data["train"][0]) < args.batch_size:
        sys.exit(f"error: {len(data['train'][0])} training examples is fewer than one batch of {args.batch_size}")
    print("splits: " + ", ".join(f"{k} {len(v[0]):,}" for k, v in data.items()))
    model = build_model(args).to(device)
    print(model_summary(model))
    optimizer = clipping_scaling(model, recipe["LR_start"], args.optimizer)
    checkpoint = Path(args.save_path).with_suffix(".ckpt")
    for path in filter(None, (args.save_path, args.metrics)):  # fail now, not after an epoch
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            sys.exit(f"error: cannot write {path}: {e.strerror or e}")
    try:
        train(model, optimizer, data, args.batch_size, recipe["LR_start"], recipe["LR_fin"], args.epochs,
              save_path=args.save_path, checkpoint_path=checkpoint, metrics_path=args.metrics,
              resume=args.resume, seed=args.seed, progress=not args.no_progress,
              checkpoint_every=args.checkpoint_every, fast_step=fast,
              eval_batch_size=FAST_EVAL_BATCH if fast else None)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: the last finished epoch is in {checkpoint}; continue with --resume")
