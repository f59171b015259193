"""Training loop for SCSONet and its peers, readable top to bottom (after nanoGPT's train.py).

One device (CUDA, Apple MPS or CPU, chosen automatically):
    scsonet train --config configs/isic2017_scsonet.yaml
Continue a killed run from its last completed epoch:
    scsonet train --resume runs/<run>
Two processes with torch.distributed (gloo on the CPU, NCCL on GPUs):
    torchrun --standalone --nproc_per_node 2 -m scsonet.cli.main train --config configs/isic2017_scsonet.yaml

Protocols: ``honest`` fits on train, selects the checkpoint on val and reads test once, at the
end; ``paper`` fits on train+val and selects on test, as the published tables did (every output
of such a run says so). A run stopped by its time budget (``max_minutes``) does not read test:
``--resume`` continues it, and the run that reaches the last epoch tests. The run directory
keeps the first segment's ``config.yaml``; ``segments.jsonl`` gets one record per segment (fresh
start or resume): epochs, wall times, why it stopped, its config, version and commit.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from ._device import resolve_device
from ._io import torch_save_atomic, write_json_atomic, write_text_atomic
from .data.robust_augment import check_robust_config
from ._checks import one_line
from .errors import ScsonetError
from .evaluation import evaluate, write_report
from .fast import optimizer_options, prepare_for_training
from .losses import BceDiceLoss
from .models import create_model
from .models._loading import PRETRAINED, build_model, load_state, read_checkpoint
from .models.egeunet import deep_supervision_loss
from .parallel import ModelLoss, SplitBatchStep, cpu_budget

PROTOCOLS = {
    # protocol: (splits fitted on, split that selects the checkpoint)
    "honest": (("train",), "val"),
    "paper": (("train", "val"), "test"),
}
LOG_COLUMNS = ("epoch", "lr", "loss", "select_split", "select_dsc", "select_miou", "best_dsc", "seconds")
SEGMENTS = "segments.jsonl"  # one JSON record per training segment, in the run directory
TEST_REPORT = Path("test") / "report.json"


@dataclass
class TrainConfig:
    data: str = "data/isic2017"  # prepared dataset folder (scsonet data prepare)
    model: str = "scsonet"  # registered model name
    model_args: dict = field(default_factory=dict)  # extra constructor arguments of the model
    protocol: str = "honest"  # honest | paper (see module docstring)
    epochs: int = 300  # the paper's 300
    batch_size: int = 8  # per process
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW weight decay
    t_max: int = 50  # cosine half-period in epochs; the rate then climbs back (CosineAnnealingLR)
    eta_min: float = 1e-5  # cosine floor
    bce_weight: float = 1.0  # BCE + Dice, 1:1 in the paper
    dice_weight: float = 1.0
    augment: bool = True  # flips and rotation, p = 0.5 each, per sample
    robust_augment: dict = field(default_factory=dict)  # {transform: probability} of RobustAugment ({} = the paper's only)
    init_from: str = ""  # start from these weights (a pretrained name or a checkpoint) instead of random ones
    seed: int = 42
    eval_every: int = 1  # epochs between selections on the selection split
    eval_batch_size: int = 16
    max_minutes: float = 0.0  # stop after the epoch that passes this wall-clock budget (0 = none)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "off"  # off | bf16 (autocast; this tiny network is launch-bound, so off is the default)
    cuda_graph: bool = True  # capture the whole training step as a CUDA graph (single CUDA process)
    fast: bool = True  # CPU: exact re-expressions of slow blocks and fused AdamW (scsonet.fast)
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    processes: int = 0  # CPU: split each batch among one-thread processes (0 = one per usable CPU; 1 = off)
    out_dir: str = "runs"  # run directories are created here
    run_name: str = ""  # default: <model>-<protocol>-s<seed>
    tensorboard: bool = True  # log to TensorBoard when it is installed
    progress: bool = True  # progress bar


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then a YAML file, then ``key=value`` overrides, each checked against its default's type."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ScsonetError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ScsonetError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ScsonetError(f"{path}: a config must be a mapping of key: value")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ScsonetError(f"--set {item!r}: expected key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ScsonetError(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
    defaults = TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise ScsonetError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ScsonetError(f"config {key}={value!r}: expected {expected.__name__}")
        checked[key] = value
    cfg = TrainConfig(**checked)
    if cfg.protocol not in PROTOCOLS:
        raise ScsonetError(f"config protocol={cfg.protocol!r}: choose from {', '.join(PROTOCOLS)}")
    if cfg.amp not in ("bf16", "off"):
        raise ScsonetError(f"config amp={cfg.amp!r}: choose from off, bf16")
    if cfg.processes < 0:
        raise ScsonetError(f"config processes={cfg.processes}: expected 0 (automatic), 1 (off) or more")
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """The ranges of the numeric settings, then the model built once (on the CPU: it is small) from
    ``model`` and ``model_args``: a bad value stops here, before any data is read or file written."""
    finite = math.isfinite
    rules = (
        ("epochs", cfg.epochs >= 1, "an integer >= 1"),
        ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
        ("eval_batch_size", cfg.eval_batch_size >= 1, "an integer >= 1"),
        ("eval_every", cfg.eval_every >= 1, "an integer >= 1 (epochs)"),
        ("t_max", cfg.t_max >= 1, "an integer >= 1 (epochs)"),
        ("seed", 0 <= cfg.seed < 2**32, "an integer in 0..2**32-1"),  # what every RNG in use accepts
        ("threads", cfg.threads >= 0, "an integer >= 0 (0 = torch's default)"),
        ("lr", finite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
        ("eta_min", finite(cfg.eta_min) and 0 <= cfg.eta_min <= cfg.lr, f"a finite number in 0..lr ({cfg.lr:g})"),
        ("weight_decay", finite(cfg.weight_decay) and cfg.weight_decay >= 0, "a finite number >= 0"),
        ("bce_weight", finite(cfg.bce_weight) and cfg.bce_weight >= 0, "a finite number >= 0"),
        ("dice_weight", finite(cfg.dice_weight) and cfg.dice_weight >= 0, "a finite number >= 0"),
        ("dice_weight", cfg.bce_weight > 0 or cfg.dice_weight > 0, "a number > 0 when bce_weight is 0 (no loss)"),
        ("max_minutes", finite(cfg.max_minutes) and cfg.max_minutes >= 0, "a finite number >= 0 (0 = no budget)"),
    )
    for key, ok, expected in rules:
        if not ok:
            raise ScsonetError(f"config {key}={getattr(cfg, key)!r}: expected {expected}")
    check_robust_config(cfg.robust_augment)
    if cfg.init_from and cfg.init_from not in PRETRAINED and not Path(cfg.init_from).is_file():
        raise ScsonetError(f"config init_from={cfg.init_from!r}: no such file, and not a pretrained name "
                           f"({', '.join(PRETRAINED)})")
    build_model(cfg.model, cfg.model_args, "config")


def _init_weights(model: torch.nn.Module, cfg: TrainConfig, mean, std) -> None:
    """Load ``cfg.init_from`` into ``model``: same architecture and the data's normalisation, or an error."""
    from .models import load_model

    loaded = load_model(cfg.init_from, "cpu")
    where = f"config init_from={cfg.init_from!r}"
    if loaded.name != cfg.model:
        raise ScsonetError(f"{where}: those weights are a {loaded.name!r}, the config trains a {cfg.model!r}")
    if any(abs(a - b) > 1e-4 for a, b in zip([*loaded.preset.mean, *loaded.preset.std], [*mean, *std])):
        raise ScsonetError(f"{where}: trained with mean {list(loaded.preset.mean)} std {list(loaded.preset.std)}, "
                           f"the data has mean {list(mean)} std {list(std)}")
    try:
        model.load_state_dict(loaded.model.state_dict(), strict=True)
    except RuntimeError as err:
        raise ScsonetError(f"{where}: does not fit model_args {cfg.model_args} ({str(err).splitlines()[0]})") from None


def get_lr(epoch: int, cfg: TrainConfig) -> float:
    """Cosine annealing in closed form, as torch's CosineAnnealingLR: period 2 * t_max epochs."""
    return cfg.eta_min + (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * epoch / cfg.t_max)) / 2


class NonFiniteLoss(ScsonetError):
    pass


def _setup_distributed(cfg: TrainConfig):
    """(rank, world_size, device); initialises the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(cfg.device)
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world_size, device


def _split_processes(cfg: TrainConfig, device: torch.device, world_size: int) -> int:
    """Processes to split each batch among: one per usable CPU by default, on the fast CPU path.

    One single-threaded process per core beats one process with a thread per core for this
    small network (``scsonet.parallel``); torchrun runs, GPUs and autocast keep one process.
    """
    if device.type != "cpu" or world_size > 1 or cfg.amp != "off":
        return 1
    if cfg.processes:
        return min(cfg.processes, cfg.batch_size)
    return min(cpu_budget(), cfg.batch_size) if cfg.fast else 1


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buf.getvalue())


def read_segments(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/segments.jsonl``, oldest first (none for a run that predates it)."""
    path = Path(run_dir) / SEGMENTS
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ScsonetError(f"{path}: cannot read the run's segment records ({err.strerror})") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise ScsonetError(f"{path}: line {n} is not a segment record")
        records.append(record)
    return records


class _Segment:
    """This process's record in ``segments.jsonl``: written at the start as ``running``, then
    rewritten once with why it stopped. A record still ``running`` when a later segment starts
    belonged to a process that died without a word (kill -9, power cut): it becomes ``killed``."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, done_epochs: int, resumed: bool):
        from . import __version__
        from .publish import _git_commit

        self.path = run_dir / SEGMENTS
        self.records = read_segments(run_dir)
        for record in self.records:
            if record.get("stopped") == "running":
                record["stopped"] = "killed"
                record["last_epoch"] = done_epochs if resumed else record.get("first_epoch", 1) - 1
        self.started = time.time()
        self.record = {"segment": len(self.records) + 1, "resumed": resumed, "first_epoch": done_epochs + 1,
                       "last_epoch": done_epochs, "epochs": cfg.epochs, "started_at": _utc(self.started),
                       "ended_at": None, "wall_seconds": None, "stopped": "running", "test_read": False,
                       "scsonet_version": __version__, "git_commit": _git_commit(),
                       "config": dataclasses.asdict(cfg)}
        self.records.append(self.record)
        self._write()

    def end(self, stopped: str, history: list[dict[str, Any]], test_read: bool) -> None:
        now = time.time()
        self.record.update(last_epoch=int(history[-1]["epoch"]) if history else 0, ended_at=_utc(now),
                           wall_seconds=round(now - self.started, 1), stopped=stopped, test_read=test_read)
        self._write()

    def _write(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _stop_reason(err: BaseException) -> str:
    if isinstance(err, NonFiniteLoss):
        return "non-finite loss"
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    return f"error ({type(err).__name__})"


def _last_good(run_dir: Path) -> str:
    last = run_dir / "last.pt"
    return f"the last good checkpoint is {last}" if last.is_file() else f"no checkpoint was written yet ({run_dir})"


class _GraphedStep:
    """The whole training step (forward, loss, backward, AdamW) replayed as one CUDA graph.

    A tiny network at batch 8 is bound by kernel-launch overhead on a GPU; replaying a captured
    graph removes it. Shapes are fixed (the loader drops the last partial batch) and the learning
    rate lives in a tensor that the graph reads.
    """

    warmup_steps = 3

    def __init__(self, compute_loss, optimizer, x_like, y_like):
        self.compute_loss, self.optimizer = compute_loss, optimizer
        self.x, self.y = torch.empty_like(x_like), torch.empty_like(y_like)
        self.graph = None
        self.loss = None
        self.steps = 0

    def _step(self):
        loss = self.compute_loss(self.x, self.y)
        loss.backward()
        self.optimizer.step()
        return loss

    def __call__(self, x, y):
        self.x.copy_(x)
        self.y.copy_(y)
        if self.graph is None and self.steps >= self.warmup_steps:
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self._step()
        if self.graph is not None:
            self.graph.replay()
            loss = self.loss
        else:  # warm-up on a side stream, as graph capture requires
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step()
            torch.cuda.current_stream().wait_stream(stream)
        self.steps += 1
        return loss


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Path:
    """Train as ``cfg`` says (or continue ``resume``); returns the run directory."""
    check_config(cfg)  # also for a TrainConfig built in Python, not only one from load_config
    from .data import PreparedData, SplitArrays
    from .data.loader import TrainLoader

    rank, world_size, device = _setup_distributed(cfg)
    master = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fit_splits, select_split = PROTOCOLS[cfg.protocol]

    # -- run directory and state: fresh, or from the last checkpoint of a killed run
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "last.pt").is_file():
            raise ScsonetError(f"{run_dir}: no last.pt to resume from")
        ckpt = read_checkpoint(run_dir / "last.pt", require=("model", "optimizer", "epoch", "best_val_dsc", "history"))
    else:
        run_name = cfg.run_name or f"{cfg.model}-{cfg.protocol}-s{cfg.seed}"
        run_dir = Path(cfg.out_dir) / run_name
        if (run_dir / "last.pt").exists():
            raise ScsonetError(f"{run_dir}: a run is already there; continue it with --resume {run_dir}")
        ckpt = None
    if ckpt is not None and ckpt["epoch"] + 1 >= cfg.epochs and (run_dir / TEST_REPORT).is_file():
        raise ScsonetError(f"{run_dir}: already trained to epoch {ckpt['epoch'] + 1} of {cfg.epochs} and tested; "
                           f"nothing to resume (--set epochs=N trains on)")
    # -- data, read before the run directory exists so that a bad dataset leaves nothing behind;
    #    the test split is not touched here under the honest protocol
    data = PreparedData(cfg.data)
    fit_parts = [data.load(s) for s in fit_splits]
    fit = SplitArrays(torch.cat([p.images for p in fit_parts]), torch.cat([p.masks for p in fit_parts]),
                      [i for p in fit_parts for i in p.ids])
    select = data.load(select_split) if master else None
    mean, std = data.mean, data.std
    preprocessing = {"resize_size": list(fit.images.shape[-2:]), "mean": list(mean), "std": list(std)}
    use_graph = cfg.cuda_graph and device.type == "cuda" and world_size == 1
    loader = TrainLoader(fit, cfg.batch_size, mean, std, augment=cfg.augment, shuffle=True, seed=cfg.seed,
                         device=device, drop_last=use_graph, rank=rank, world_size=world_size,
                         robust_augment=cfg.robust_augment)

    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:  # a resume keeps the first segment's config; its own goes to segments.jsonl
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    # -- model and optimiser: the same seed gives the same initial weights on every rank
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_args).to(device)
    if cfg.init_from and ckpt is None:  # fine-tuning; a resumed run has its own weights
        _init_weights(model, cfg, mean, std)
    optimizer_kwargs = {}
    if cfg.fast:
        model = prepare_for_training(model, device)
        optimizer_kwargs = optimizer_options(device)
    lr_value = torch.tensor(get_lr(0, cfg), device=device) if use_graph else get_lr(0, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_value, weight_decay=cfg.weight_decay,
                                  capturable=use_graph, **optimizer_kwargs)
    start_epoch, best_dsc, history = 0, -1.0, []
    if ckpt is not None:
        last = run_dir / "last.pt"
        load_state(model, ckpt["model"], cfg.model, str(last))
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as err:  # another model's or optimiser's state
            raise ScsonetError(f"{last}: its optimiser state does not fit {cfg.model} ({one_line(err)})") from None
        start_epoch, best_dsc, history = ckpt["epoch"] + 1, ckpt["best_val_dsc"], ckpt["history"]
    raw_model = model
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = BceDiceLoss(cfg.bce_weight, cfg.dice_weight)
    # No autocast weight cache: it would hold tensors captured by the CUDA graph.
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False))
                if cfg.amp == "bf16" else contextlib.nullcontext)
    graphed = None

    model_loss = ModelLoss(criterion, deep_supervision_loss)  # deep supervision when the model has side outputs

    def compute_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model_loss(model, x, y)

    processes = _split_processes(cfg, device, world_size)
    split_step = SplitBatchStep(raw_model, model_loss, processes) if processes > 1 else None

    def checkpoint(epoch: int) -> dict[str, Any]:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_name": cfg.model,
                "model_args": cfg.model_args, "preprocessing": preprocessing, "epoch": epoch,
                "best_val_dsc": best_dsc, "select_split": select_split, "protocol": cfg.protocol,
                "config": dataclasses.asdict(cfg), "history": history}

    writer = _tensorboard(run_dir) if master and cfg.tensorboard else None
    started = time.time()
    from tqdm import tqdm

    segment = _Segment(run_dir, cfg, start_epoch, resume is not None) if master else None
    stopped, tested = "interrupted", False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # -- one epoch over the fitting data
            t0 = time.time()
            lr = get_lr(epoch, cfg)
            for group in optimizer.param_groups:
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            loader.set_epoch(epoch)
            model.train()
            total_loss = torch.zeros((), device=device)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                       disable=not (master and cfg.progress))
            for step, (x, y) in enumerate(bar):
                if use_graph:
                    graphed = graphed or _GraphedStep(compute_loss, optimizer, x, y)
                    try:
                        with autocast():
                            loss = graphed(x, y)
                    except RuntimeError as err:  # capture unsupported here: train eagerly instead
                        print(f"CUDA graph capture failed ({str(err).splitlines()[0]}); continuing eagerly", flush=True)
                        use_graph = False
                        torch.cuda.synchronize()
                if not use_graph:
                    if split_step is not None:  # forward and backward over the helper processes
                        loss = split_step(x, y)
                    else:
                        with autocast():
                            loss = compute_loss(x, y)
                        loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                total_loss += loss.detach()
                if step % 20 == 0 or step == len(loader) - 1:
                    value = loss.item()
                    if not math.isfinite(value):
                        raise NonFiniteLoss(f"loss became {value} at epoch {epoch + 1}, step {step + 1}; "
                                            f"{_last_good(run_dir)}")
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            mean_loss = (total_loss / len(loader)).item()
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"loss became {mean_loss} in epoch {epoch + 1}; {_last_good(run_dir)}")

            # -- selection on the selection split, checkpoints and log (master only)
            if master:
                row = {"epoch": epoch + 1, "lr": f"{lr:.6g}", "loss": f"{mean_loss:.6f}", "select_split": select_split,
                       "select_dsc": "", "select_miou": "", "best_dsc": "", "seconds": ""}
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    report, _ = evaluate(raw_model, select, (mean, std), batch_size=cfg.eval_batch_size,
                                         device=device, hd95=False, split=select_split)
                    dsc, miou = report["pooled"]["dsc"], report["pooled"]["miou"]
                    row.update(select_dsc=f"{dsc:.6f}", select_miou=f"{miou:.6f}")
                    if dsc > best_dsc:
                        best_dsc = dsc
                        torch_save_atomic(checkpoint(epoch), run_dir / "best.pt")
                    if writer is not None:
                        writer.add_scalar(f"{select_split}/dsc", dsc, epoch + 1)
                row.update(best_dsc=f"{best_dsc:.6f}", seconds=f"{time.time() - t0:.1f}")
                history.append(row)
                torch_save_atomic(checkpoint(epoch), run_dir / "last.pt")
                _write_log(run_dir / "log.csv", history)
                if writer is not None:
                    writer.add_scalar("train/loss", mean_loss, epoch + 1)
                    writer.add_scalar("train/lr", lr, epoch + 1)
                print(f"epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} lr {lr:.2e} {select_split} "
                      f"dsc {row['select_dsc'] or '-'} best {best_dsc:.4f} ({row['seconds']} s)", flush=True)
            if world_size > 1:
                dist.barrier()
            if cfg.max_minutes and time.time() - started > cfg.max_minutes * 60 and epoch + 1 < cfg.epochs:
                stopped = "time budget"
                if master:
                    print(f"time budget of {cfg.max_minutes} min spent after epoch {epoch + 1} of {cfg.epochs}; "
                          f"stopped early, the test split was not read. Continue with: "
                          f"scsonet train --resume {run_dir}", flush=True)
                break
        else:
            stopped = "completed"
        if split_step is not None:
            split_step.close()  # before the test: the helpers' memory is not needed any more

        # -- the test split, read once, with the selected checkpoint, by the run that reached the last epoch
        if master and stopped == "completed":
            final_test(run_dir, cfg, device)
            tested = True
    except BaseException as err:
        stopped = _stop_reason(err)
        raise
    finally:
        if split_step is not None:
            split_step.close()
        if segment is not None:
            segment.end(stopped, history, tested)
    if writer is not None:
        writer.close()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def final_test(run_dir: Path, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Evaluate ``best.pt`` on the test split and write ``test/report.json`` + ``test/per_image.csv``."""
    from .data import PreparedData
    from .models import load_model

    loaded = load_model(run_dir / "best.pt", device)
    report, rows = evaluate(loaded, PreparedData(cfg.data).load("test"), batch_size=cfg.eval_batch_size,
                            device=device, split="test")
    write_report(report, rows, run_dir / "test")
    pooled = report["pooled"]
    print(f"test ({cfg.protocol} protocol, best epoch {loaded.meta.get('epoch', 0) + 1}): "
          f"DSC {pooled['dsc'] * 100:.2f} mIoU {pooled['miou'] * 100:.2f}", flush=True)
    return report


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
