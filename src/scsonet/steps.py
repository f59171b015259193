"""Training steps: one batch's forward, loss, backward and optimiser update, one class per way of
running it. ``choose_step`` picks the class once per run, from the device and the config:

- ``EagerStep``: plain PyTorch, optionally under bf16 autocast. Any device, torchrun included.
- ``CudaGraphStep``: the same step captured once as a CUDA graph and replayed (one CUDA process).
  A tiny network at batch 8 is bound by kernel-launch overhead on a GPU; a replay removes it.
  Where capture fails, it says so once and goes on eagerly.
- ``SplitProcessStep``: forward and backward with the batch split among one-thread processes
  (``scsonet.parallel``), the update in this process. The CPU, float32, one process per run.

Each is called as ``step(images, masks) -> loss`` (a detached scalar tensor); ``set_lr(lr)`` sets
the rate for the steps that follow and ``close()`` lets go of what the step holds (its processes).
Two class attributes tell the trainer how to build what the step reads: ``capturable`` (AdamW
keeps its rate and state in tensors a graph can read) and ``drop_last`` (fixed batch shapes).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn as nn

from .parallel import SplitBatchStep, cpu_budget

__all__ = ["CudaGraphStep", "EagerStep", "SplitProcessStep", "choose_step"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, images, masks) -> mean loss


class EagerStep:
    """Forward and loss (under autocast when ``amp="bf16"``), backward, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``: the loop body of nanoGPT.

    Args:
        model: the model in training mode (DDP-wrapped under torchrun).
        loss_fn: ``(model, images, masks) -> scalar`` (``scsonet.parallel.ModelLoss``).
        optimizer: the optimiser of the model's parameters.
        amp: ``"off"`` or ``"bf16"`` (``"off"``).
    """

    capturable = False
    drop_last = False

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, amp: str = "off"):
        self.model, self.loss_fn, self.optimizer, self.amp = model, loss_fn, optimizer, amp
        self.device_type = next(model.parameters()).device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp != "bf16":
            return contextlib.nullcontext()
        # No weight cache: it would keep tensors that a captured CUDA graph reads.
        return torch.autocast(self.device_type, dtype=torch.bfloat16, cache_enabled=False)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):  # a capturable optimiser: the graph reads this tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def forward_backward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The loss of the batch, its gradient added to the parameters' ``.grad``."""
        with self.autocast():
            loss = self.loss_fn(self.model, images, masks)
        loss.backward()
        return loss.detach()

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(images, masks)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def close(self) -> None:
        pass


class SplitProcessStep(EagerStep):
    """``EagerStep`` with forward and backward over ``processes`` one-thread processes
    (``scsonet.parallel.SplitBatchStep``: the same gradients up to float rounding); float32 only.

    ``loss_fn`` must be picklable and a mean over samples.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, processes: int):
        super().__init__(model, loss_fn, optimizer)
        self.split = SplitBatchStep(model, loss_fn, processes)

    def forward_backward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.split(images, masks)

    def close(self) -> None:
        self.split.close()


class CudaGraphStep(EagerStep):
    """The whole step (forward, loss, backward, AdamW) replayed as one CUDA graph.

    A few eager warm-up steps run on a side stream, as capture requires; the next call captures
    the step into static input buffers and every call from then on copies the batch in and
    replays. Shapes are therefore fixed (``drop_last``) and the optimiser must be capturable,
    with its rate in a tensor (``set_lr`` fills it). If warm-up or capture raises a
    ``RuntimeError`` (capture unsupported here), the step says so once and runs eagerly.
    """

    capturable = True
    drop_last = True
    warmup_steps = 3

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, amp: str = "off"):
        super().__init__(model, loss_fn, optimizer, amp)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None  # the graph's input buffers
        self.static_loss: torch.Tensor | None = None  # the graph's output
        self.steps = 0
        self.eager = False  # set once capture has failed

    def _step(self) -> torch.Tensor:
        loss = self.loss_fn(self.model, *self.static)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _graphed(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.static is None:
            self.static = (torch.empty_like(images), torch.empty_like(masks))
        for buf, t in zip(self.static, (images, masks)):
            buf.copy_(t)
        if self.graph is None and self.steps >= self.warmup_steps:
            self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it fills
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self._step()
        if self.graph is not None:
            self.graph.replay()
            loss = self.static_loss
        else:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step()
            torch.cuda.current_stream().wait_stream(stream)
        self.steps += 1
        return loss

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if not self.eager:
            try:
                with self.autocast():  # backward and update too, as captured
                    return self._graphed(images, masks)
            except RuntimeError as err:
                print(f"CUDA graph capture failed ({str(err).splitlines()[0]}); continuing eagerly", flush=True)
                self.eager = True
                torch.cuda.synchronize()
                # a capture that failed part-way leaves gradients that no kernel ever wrote
                self.optimizer.zero_grad(set_to_none=True)
        return super().__call__(images, masks)


def _split_processes(cfg: Any, device: torch.device, world_size: int) -> int:
    """Processes to split each batch among: one per usable CPU by default, on the fast CPU path.

    One single-threaded process per core beats one process with a thread per core for this
    small network (``scsonet.parallel``); torchrun runs, GPUs and autocast keep one process.
    """
    if device.type != "cpu" or world_size > 1 or cfg.amp != "off":
        return 1
    if cfg.processes:
        return min(cfg.processes, cfg.batch_size)
    return min(cpu_budget(), cfg.batch_size) if cfg.fast else 1


def choose_step(cfg: Any, device: torch.device, world_size: int) -> tuple[type[EagerStep], dict[str, Any]]:
    """The step class for a run of ``cfg`` (a ``TrainConfig``) on ``device`` among ``world_size``
    processes, and its keyword arguments beyond ``(model, loss_fn, optimizer)``."""
    if cfg.cuda_graph and device.type == "cuda" and world_size == 1:
        return CudaGraphStep, {"amp": cfg.amp}
    processes = _split_processes(cfg, device, world_size)
    if processes > 1:
        return SplitProcessStep, {"processes": processes}
    return EagerStep, {"amp": cfg.amp}
