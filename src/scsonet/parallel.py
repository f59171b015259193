"""Split-batch training steps on the CPU: one process per core, one thread each, the same step.

With a few cores, one process running the step on several threads wastes much of them: most
of a small network's ops are too small to split across threads well, and each split op pays
a fork-join. ``SplitBatchStep`` gives every core its own process, running one thread on its
own slice of the batch. The processes share the parameters (shared memory) and compute the
gradient of their slice's share of the loss; the main process sums the gradients in a fixed
order, so a run is reproducible. BatchNorm layers (ODConv's attention here, the peers'
BatchNorms) take their statistics over the whole batch, exchanged between the processes, so
the step computes the same function as one process would: the loss and the gradients agree
with a single-process step up to float rounding (``tests/test_parallel.py``).

The loss must be a mean over samples (``BceDiceLoss`` and deep supervision are): each slice's
loss is weighted by its share of the batch. The optimiser step stays in the main process.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
import weakref
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ._twins import retyped

__all__ = ["SplitBatchStep", "ModelLoss", "cpu_budget"]

# float64 values per process and exchange; a BatchNorm of C channels exchanges 2C + 1
EXCHANGE_CAPACITY = 1 << 14
# seconds a process waits for the others at a synchronisation point before giving up
DEFAULT_TIMEOUT = 300.0


class ModelLoss:
    """``criterion(model(x), y)``, plus deep supervision when the model keeps side outputs.

    The loss of a training step as a picklable callable ``(model, x, y) -> scalar``, for the
    split-batch processes; ``aux_loss(aux_logits, y, criterion)`` adds the side outputs' terms.
    """

    def __init__(self, criterion: Callable, aux_loss: Callable | None = None):
        self.criterion, self.aux_loss = criterion, aux_loss

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(model(x), y)
        aux = getattr(getattr(model, "module", model), "aux_logits", None)  # through a DDP wrapper
        if aux and self.aux_loss is not None:
            loss = loss + self.aux_loss(aux, y, self.criterion)
        return loss


def cpu_budget(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """CPUs this process may keep busy: torch's thread count, capped by its CPU affinity and by a
    container's CPU quota (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), at least 1.

    torch counts the host's cores even when a container may use only a few; one process per
    counted core would then oversubscribe the quota, which is many times slower.
    """
    budget = torch.get_num_threads()
    if hasattr(os, "sched_getaffinity"):
        budget = min(budget, len(os.sched_getaffinity(0)))
    root = Path(cgroup_root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            quota, period = "max", "1"
    if quota not in ("max", "-1"):
        with contextlib.suppress(ValueError, ZeroDivisionError):
            budget = min(budget, int(int(quota) / int(period)))
    return max(budget, 1)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class _Exchange:
    """Sums of small float64 vectors over the processes of a split step, through shared memory.

    Every process writes its vector into its row, waits for the others, and adds the rows in
    rank order, so all processes get bitwise the same sum. Two alternating buffers make one
    barrier per exchange enough: a process can only overwrite a buffer after every process has
    passed the next exchange's barrier, that is, after all have read it.
    """

    def __init__(self, rank: int, slots: torch.Tensor, barrier, timeout: float):
        self.rank, self.slots, self.barrier, self.timeout = rank, slots, barrier, timeout
        self.parity = 0
        self.active = False

    def wait(self) -> None:
        self.barrier.wait(self.timeout)

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        n = values.numel()
        if n > self.slots.shape[-1]:
            raise ValueError(f"exchange of {n} values exceeds the capacity of {self.slots.shape[-1]}")
        slot = self.slots[self.parity]
        self.parity ^= 1
        slot[self.rank, :n].copy_(values.flatten())
        self.wait()
        total = slot[0, :n].clone()
        for row in slot[1:]:
            total += row[:n]
        return total.view_as(values)


class _SplitBatchNormFn(torch.autograd.Function):
    """Training-mode batch norm whose statistics cover the slices of all processes.

    Forward exchanges per-channel sums and sums of squares (float64); backward exchanges the
    sums of dy and dy * (x - mean) that the input gradient needs. The weight and bias
    gradients stay per slice: the main process sums them with all other gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn: nn.modules.batchnorm._BatchNorm, exchange: _Exchange):
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        local = torch.cat([x.sum(dims, dtype=torch.float64), x.square().sum(dims, dtype=torch.float64),
                           torch.tensor([count], dtype=torch.float64)])
        total = exchange.all_sum(local)
        c = x.shape[1]
        n = total[-1]
        mean64 = total[:c] / n
        var64 = (total[c:2 * c] / n - mean64.square()).clamp_min(0)
        invstd = (var64 + bn.eps).rsqrt().to(x.dtype)
        mean = mean64.to(x.dtype)
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = invstd if weight is None else weight * invstd
        y = x * scale.view(shape) + (-mean * scale if bias is None else bias - mean * scale).view(shape)
        if bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
            unbiased = var64 * (n / (n - 1)) if n > 1 else var64
            bn.running_mean.mul_(1 - momentum).add_(mean64.to(bn.running_mean.dtype), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.exchange, ctx.count = exchange, n.item()
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        centered = x - mean.view(shape)
        sum_dy = grad_y.sum(dims, dtype=torch.float64)
        sum_dy_xc = (grad_y * centered).sum(dims, dtype=torch.float64)
        total = ctx.exchange.all_sum(torch.cat([sum_dy, sum_dy_xc]))
        c, n = x.shape[1], ctx.count
        mean_dy = (total[:c] / n).to(x.dtype)
        proj = (total[c:] / n).to(x.dtype) * invstd.square()
        scale = invstd if weight is None else weight * invstd
        grad_x = (grad_y - mean_dy.view(shape) - centered * proj.view(shape)) * scale.view(shape)
        grad_w = None if weight is None else (sum_dy_xc.to(x.dtype) * invstd)
        grad_b = None if weight is None else sum_dy.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None


class _SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Base of the split twin of a BatchNorm class: while its exchange is active (a split step) and
    it is training, its statistics cover the slices of all processes; otherwise it is the plain one."""

    exchange: _Exchange | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.exchange is not None and self.exchange.active:
            return _SplitBatchNormFn.apply(x, self.weight, self.bias, self, self.exchange)
        return super().forward(x)


@functools.lru_cache(maxsize=None)
def _split_twin(cls: type[nn.Module]) -> type[nn.Module]:
    """The split twin of a BatchNorm class (``BatchNorm2d``, ODConv's ``BatchNormAnyBatch``, ...)."""
    return type(f"Split{cls.__name__}", (_SplitBatchNorm, cls), {"plain": cls})


def _attach(model: nn.Module, exchange: _Exchange) -> list[nn.Module]:
    """Switch the model's BatchNorms to their split twins on ``exchange``; returns them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        retyped(bn, _split_twin(type(bn))).exchange = exchange
    return norms


def _detach(norms: list[nn.Module]) -> None:
    """The plain BatchNorms again."""
    for bn in norms:
        if isinstance(bn, _SplitBatchNorm):
            del bn.exchange
            retyped(bn, bn.plain)


def _flat_grads(params: list[nn.Parameter], out: torch.Tensor) -> None:
    """All gradients, in parameter order, into the flat ``out`` (zeros where there is none)."""
    torch.cat([p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in params], out=out)


def _die_with_parent(kernel_signal: bool) -> None:
    """End this helper as soon as its parent dies, by whatever signal, SIGKILL included.

    A helper waiting at a barrier, or on a lock its dead parent held, would otherwise live on
    (for minutes, or for ever), holding its memory. On Linux the kernel sends SIGKILL when the
    parent dies (``PR_SET_PDEATHSIG``); it watches the thread that spawned us, so the parent
    asks for it only when that is its main thread. Everywhere, a daemon thread also waits on
    the parent's sentinel (end of file, or a process handle, once the parent is gone). Once the
    parent and the helpers are gone, multiprocessing's resource tracker reads the end of its pipe,
    unlinks the barrier's semaphores and exits too (``tests/test_process_lifetime.py``).
    """
    parent = mp.parent_process()
    if kernel_signal and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if parent is None:
        return
    if os.name == "posix" and os.getppid() != parent.pid:  # it died before the signal was armed
        os._exit(1)

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="scsonet-parent-watch", daemon=True).start()


def _helper(rank: int, model: nn.Module, loss_fn: Callable, conn, barrier, shared: dict, timeout: float,
            kernel_signal: bool = False) -> None:
    """A helper process: on each message, the gradient of its slice; None ends it."""
    from .fast import tune_cpu_allocator

    _die_with_parent(kernel_signal)
    torch.set_num_threads(1)
    tune_cpu_allocator()
    # Parameters stay shared; buffers (running statistics) are the main process's to update.
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.clone()
    exchange = _Exchange(rank, shared["slots"], barrier, timeout)
    exchange.active = True
    _attach(model, exchange)
    model.train()
    params = list(model.parameters())
    inputs = None
    while (msg := conn.recv()) is not None:
        try:
            inputs = msg.get("inputs", inputs)
            start, stop, total = msg["slice"]
            for p in params:
                p.grad = None
            loss = loss_fn(model, *(t[start:stop] for t in inputs)) * ((stop - start) / total)
            loss.backward()
            _flat_grads(params, shared["grads"][rank - 1])
            shared["losses"][rank] = loss.detach()
            exchange.wait()
        except threading.BrokenBarrierError:
            return  # another process failed; the main process reports it
        except BaseException:
            conn.send(traceback.format_exc())
            barrier.abort()
            return


def _stop(conns, procs) -> None:
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(None)
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()


class SplitBatchStep:
    """Forward and backward of a training step, the batch split among ``processes`` processes.

    Each call fills the parameters' ``.grad`` (accumulating, as ``backward`` does) with the
    gradient of ``loss_fn(model, inputs, targets)`` over the whole batch and returns the loss;
    the caller runs the optimiser. The main process takes the first slice; ``processes - 1``
    helper processes (spawned once, one thread each) take the others. Batches smaller than
    ``processes`` run in the main process alone.

    Args:
        model: the model, in training mode; its parameters move to shared memory.
        loss_fn: ``(model, inputs, targets) -> scalar``, a mean over samples (see ``ModelLoss``); picklable.
        processes: processes in all, the main one included (2).
        timeout: seconds to wait at a synchronisation point before a step fails (300).

    Use it as a context manager, or call ``close()``, to stop the helpers.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, processes: int = 2, timeout: float = DEFAULT_TIMEOUT):
        if processes < 2:
            raise ValueError(f"a split step needs at least 2 processes, got {processes}")
        self.model, self.loss_fn, self.processes = model, loss_fn, processes
        self.params = list(model.parameters())
        model.share_memory()
        ctx = mp.get_context("spawn")
        self._barrier = ctx.Barrier(processes)
        numel = sum(p.numel() for p in self.params)
        self._shared = {
            "slots": torch.zeros(2, processes, EXCHANGE_CAPACITY, dtype=torch.float64).share_memory_(),
            "grads": torch.zeros(processes - 1, numel, dtype=self.params[0].dtype).share_memory_(),
            "losses": torch.zeros(processes, dtype=self.params[0].dtype).share_memory_(),
        }
        self._exchange = _Exchange(0, self._shared["slots"], self._barrier, timeout)
        self._conns, self._procs = [], []
        for rank in range(1, processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_helper, args=(rank, model, loss_fn, child, self._barrier, self._shared, timeout,
                                                     threading.current_thread() is threading.main_thread()),
                               daemon=True, name=f"scsonet-split-{rank}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._norms = _attach(model, self._exchange)
        # each helper's flat gradient row, cut once into the parameters' shapes
        self._helper_grads = [self._views(row) for row in self._shared["grads"]]
        self._inputs: tuple[torch.Tensor, ...] | None = None
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._procs)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` cut into the shapes of the parameters, in order."""
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def _buffers_for(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """Make sure shared input buffers fit ``tensors``; True when new ones were made."""
        if self._inputs is not None and len(self._inputs) == len(tensors) and all(
            buf.shape[1:] == t.shape[1:] and buf.dtype == t.dtype and buf.shape[0] >= t.shape[0]
            for buf, t in zip(self._inputs, tensors)
        ):
            return False
        self._inputs = tuple(torch.empty_like(t).share_memory_() for t in tensors)
        return True

    def _wait(self) -> None:
        try:
            self._exchange.wait()
        except threading.BrokenBarrierError:
            raise RuntimeError(self._failure()) from None

    def _failure(self) -> str:
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            with contextlib.suppress(EOFError, OSError):
                if conn.poll(1.0):
                    return f"split-batch helper {rank} failed:\n{conn.recv()}"
            proc.join(timeout=1.0)
            if not proc.is_alive():
                return f"split-batch helper {rank} died (exit code {proc.exitcode})"
        return "split-batch step timed out waiting for a helper process"

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._finalizer.alive is False:
            raise RuntimeError("this SplitBatchStep is closed")
        batch = inputs.shape[0]
        if batch < self.processes:  # too few samples to split
            loss = self.loss_fn(self.model, inputs, targets)
            loss.backward()
            return loss.detach()
        sizes = [batch // self.processes + (r < batch % self.processes) for r in range(self.processes)]
        bounds = [sum(sizes[:r]) for r in range(self.processes + 1)]
        tensors = (inputs, targets)
        msg = {"inputs": self._inputs} if self._buffers_for(tensors) else {}
        for buf, t in zip(self._inputs, tensors):
            buf[bounds[1]:batch].copy_(t[bounds[1]:])
        for rank, conn in enumerate(self._conns, start=1):
            conn.send({**msg, "slice": (bounds[rank], bounds[rank + 1], batch)})
        self._exchange.active = True
        try:
            with _threads(1):
                loss = self.loss_fn(self.model, inputs[:bounds[1]], targets[:bounds[1]]) * (sizes[0] / batch)
                loss.backward()
        except threading.BrokenBarrierError:
            raise RuntimeError(self._failure()) from None
        except BaseException:
            self._barrier.abort()
            raise
        finally:
            self._exchange.active = False
        self._wait()
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in present]
        for views in self._helper_grads:  # rank order: reproducible sums
            torch._foreach_add_(grads, [views[i] for i in present])
        losses = self._shared["losses"]
        losses[0] = loss.detach()
        return losses.sum()

    def close(self) -> None:
        """Stop the helper processes and give the model's BatchNorms their plain class back."""
        self._finalizer()
        _detach(self._norms)

    def __enter__(self) -> SplitBatchStep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
