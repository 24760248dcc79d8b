"""The fast training step: one CUDA graph over the whole step of Algorithm 1.

On a GPU an MNIST step is ~22 GFLOP, well under a millisecond, while the eager step
launches ~150 kernels from Python: launch overhead, not arithmetic, fills the epoch.
FastStep records the step once as a CUDA graph and replays it, one launch a step:

- The data set is resident on the device (binary_net.main puts it there). The epoch's
  permutation is drawn on the CPU by the training generator, exactly as train_epoch
  draws it, and copied once per epoch into a fixed buffer; the graph gathers its batch
  from it with a step counter that it advances itself.
- The graph holds the whole step: the gather, forward, loss, backward, Adam with the
  per-layer Glorot scale (one parameter group a layer) and the clip to [-H, H]. It is
  the very code of the eager step (binary_net.train_step), so the arithmetic is the
  same: the same fused Adam, made `capturable`, with each group's LR held as a device
  tensor that binary_net.set_lr fills in place every epoch (no re-capture).
- Dropout draws from the graph-safe philox generator: a replay takes the offsets that
  the same eager step would take from the same CUDA generator state, so the masks are
  the eager step's.
- No host sync a step: the loss is summed on the device and read once an epoch.

Why torch.cuda.CUDAGraph rather than torch.compile(mode="reduce-overhead"): the graph
replays the eager kernels unchanged, so the result equals the eager step's to float
rounding of the same operations; inductor would fuse and reorder the arithmetic, needs
Triton, spends minutes compiling, and graphs forward and backward apart from the
optimizer. Capture needs a few warm-up steps (cuBLAS workspaces, Adam's lazily made
state); they run on copies' behalf: the state before them (parameters, buffers, Adam's
moments and step counts, RNGs) is put back in place afterwards, so training starts
exactly where it was, whether fresh or resumed.

Everything but the capture also runs on the CPU (graph=False), where the tests check it
against the plain loop step for step.
"""
import torch

import binary_net

WARM_UP_STEPS = 3


def make_capturable(optimizer):
    """Adam's groups as a graph needs them: `capturable`, and each LR a 0-dim tensor on
    the parameters' device. On the CPU a float64 one, which fused Adam uses exactly as a
    Python float; on CUDA a float32 one, the only type its fused kernel reads: the LR
    rounded to float32, as the reference's Theano LR (floatX) was, where the eager step
    on CUDA takes the double (a difference of at most 2^-24 of the step)."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise ValueError("the fast step takes Adam only")
    for group in optimizer.param_groups:
        device = group["params"][0].device
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)


def _snapshot(model, optimizer):
    """Copies of every tensor a training step changes."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()},
            torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


@torch.no_grad()
def _restore(model, optimizer, snapshot):
    """Put the snapshot back in place (the graph keeps the tensors' addresses). Adam state
    made since the snapshot goes back to its initial zeros, step count included."""
    tensors, optim_state, rng, cuda_rng = snapshot
    for k, v in model.state_dict().items():
        v.copy_(tensors[k])
    for p, state in optimizer.state.items():
        before = optim_state.get(p, {})
        for k, v in state.items():
            if torch.is_tensor(v):
                v.copy_(before[k]) if k in before else v.zero_()
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)


class FastStep:
    """Training epochs of binary_net.train_step over data resident on the device.

    graph=None: a CUDA graph where X is on CUDA; graph=False runs the same step eagerly
    (the CPU, and the tests)."""

    def __init__(self, model, optimizer, X, y, batch_size, graph=None):
        self.model, self.optimizer, self.X, self.y = model, optimizer, X, y
        self.batch_size, self.batches = batch_size, len(X) // batch_size
        device = X.device
        make_capturable(optimizer)
        self.order = torch.zeros(len(X), dtype=torch.long, device=device)  # the epoch's permutation
        self.step_index = torch.zeros((), dtype=torch.long, device=device)  # the graph's step counter
        self.offsets = torch.arange(batch_size, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.graph = None
        if device.type == "cuda" if graph is None else graph:
            self.graph = self._capture()

    def _step(self):
        """One step: gather the batch at step_index on the device, train, add up the loss."""
        idx = self.order[self.step_index * self.batch_size + self.offsets]
        self.loss_sum += binary_net.train_step(self.model, self.optimizer, self.X[idx], self.y[idx])
        self.step_index += 1

    def warm_up(self, steps=WARM_UP_STEPS, capture=None):
        """Run `steps` steps (and `capture`), then undo everything they changed."""
        self.model.train()
        snapshot = _snapshot(self.model, self.optimizer)
        if self.X.device.type == "cuda":
            stream = torch.cuda.Stream(self.X.device)
            stream.wait_stream(torch.cuda.current_stream(self.X.device))
            with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
                for _ in range(steps):
                    self._step()
            torch.cuda.current_stream(self.X.device).wait_stream(stream)
        else:
            for _ in range(steps):
                self._step()
        graph = capture() if capture else None
        _restore(self.model, self.optimizer, snapshot)
        return graph

    def _capture(self):
        def capture():
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # the gradients are made in the graph's pool
            with torch.cuda.graph(graph):
                self._step()
            return graph
        return self.warm_up(capture=capture)

    def epoch(self, generator, progress=False):
        """One pass over the training set, shuffled by `generator` as train_epoch shuffles
        it; returns the mean training loss (the epoch's one host sync)."""
        self.model.train()
        self.order.copy_(torch.randperm(len(self.X), generator=generator))
        self.step_index.zero_()
        self.loss_sum.zero_()
        bar = binary_net._progress(self.batches, progress)
        for i in range(self.batches):
            self.graph.replay() if self.graph is not None else self._step()
            if bar is not None and (i % 50 == 49 or i == self.batches - 1):
                bar.update(i + 1 - bar.n)  # no loss shown: reading it would sync
        if bar is not None:
            bar.close()
        return self.loss_sum.item() / max(self.batches, 1)
