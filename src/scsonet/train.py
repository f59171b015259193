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

The step of one batch is an object of ``scsonet.steps`` chosen once per run (eager, CUDA graph,
or the batch split among CPU processes); under torchrun, rank 0 decides every stop for all ranks.
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
from ._io import torch_save_atomic, write_text_atomic
from .data.robust_augment import check_robust_config
from ._checks import one_line
from .errors import ScsonetError
from .evaluation import evaluate, write_report
from .fast import optimizer_options, prepare_for_training
from .losses import BceDiceLoss
from .models import create_model
from .models._loading import PRETRAINED, build_model, load_state, read_checkpoint
from .models.egeunet import deep_supervision_loss
from .parallel import ModelLoss
from .steps import choose_step

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
    fast: bool = True  # CPU, float32: exact re-expressions of slow blocks and fused AdamW (scsonet.fast)
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


def _from_rank0(value: float, device: torch.device, world_size: int) -> float:
    """Rank 0's ``value``, on every rank: under torchrun rank 0 decides every stop (time budget,
    non-finite loss) and all ranks take it at the same step, where a rank stopping alone would
    leave the others waiting in their next collective. The other ranks also wait here for rank 0's
    evaluation and checkpoint."""
    if world_size == 1:
        return float(value)
    shared = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return shared.item()


def _check_finite(loss: float, where: str, run_dir: Path) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"loss became {loss} {where}; {_last_good(run_dir)}")


def _budget_spent(cfg: TrainConfig, started: float, epoch: int) -> bool:
    """Whether the time budget is spent after ``epoch`` (0-based); never after the last epoch, which tests."""
    return bool(cfg.max_minutes) and time.time() - started > cfg.max_minutes * 60 and epoch + 1 < cfg.epochs


def _open_run(cfg: TrainConfig, resume: str | os.PathLike | None) -> tuple[Path, dict[str, Any] | None]:
    """The run directory and, to resume, its last checkpoint; a fresh run never overwrites one, and
    a resume never reads test a second time."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "last.pt").is_file():
            raise ScsonetError(f"{run_dir}: no last.pt to resume from")
        ckpt = read_checkpoint(run_dir / "last.pt", require=("model", "optimizer", "epoch", "best_val_dsc", "history"))
    else:
        run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{cfg.model}-{cfg.protocol}-s{cfg.seed}")
        if (run_dir / "last.pt").exists():
            raise ScsonetError(f"{run_dir}: a run is already there; continue it with --resume {run_dir}")
        ckpt = None
    if ckpt is not None and ckpt["epoch"] + 1 >= cfg.epochs and (run_dir / TEST_REPORT).is_file():
        raise ScsonetError(f"{run_dir}: already trained to epoch {ckpt['epoch'] + 1} of {cfg.epochs} and tested; "
                           f"nothing to resume (--set epochs=N trains on)")
    return run_dir, ckpt


def _make_run_dir(run_dir: Path, cfg: TrainConfig, fresh: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:  # a resume keeps the first segment's config; its own goes to segments.jsonl
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def _read_data(cfg: TrainConfig, master: bool):
    """(fitting arrays, selection arrays on rank 0 else None, (mean, std)), read before the run
    directory exists so that a bad dataset leaves nothing behind. Test is not read here under
    the honest protocol."""
    from .data import PreparedData, SplitArrays

    fit_splits, select_split = PROTOCOLS[cfg.protocol]
    data = PreparedData(cfg.data)
    parts = [data.load(s) for s in fit_splits]
    fit = SplitArrays(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
                      [i for p in parts for i in p.ids])
    return fit, data.load(select_split) if master else None, (data.mean, data.std)


def _build_model(cfg: TrainConfig, device: torch.device, capturable: bool, init: bool, norm):
    """The model and its AdamW; the same seed gives the same initial weights on every rank.
    ``init``: load ``cfg.init_from`` (a fresh run; a resumed one has its own weights)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_args).to(device)
    if cfg.init_from and init:
        _init_weights(model, cfg, *norm)
    options = {}
    if cfg.fast and not (cfg.amp == "bf16" and device.type == "cpu"):  # the CPU twins are float32 kernels
        model = prepare_for_training(model, device)
        options = optimizer_options(device)
    lr = torch.tensor(get_lr(0, cfg), device=device) if capturable else get_lr(0, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, capturable=capturable,
                                  **options)
    return model, optimizer


@dataclass
class _Run:
    """What outlives an epoch on rank 0: the selection state, and the checkpoints and log written
    after each epoch."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    model: torch.nn.Module  # unwrapped: checkpoints hold its state dict, no "module." prefixes
    optimizer: torch.optim.Optimizer
    select: Any  # the selection split's arrays (None off rank 0)
    norm: tuple  # (mean, std) of the data
    size: list[int]  # the images' (height, width)
    start_epoch: int = 0
    best_dsc: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None  # TensorBoard's, when there is one

    @property
    def select_split(self) -> str:
        return PROTOCOLS[self.cfg.protocol][1]

    def restore(self, ckpt: dict[str, Any]) -> None:
        last = self.run_dir / "last.pt"
        load_state(self.model, ckpt["model"], self.cfg.model, str(last))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as err:  # another model's or optimiser's state
            raise ScsonetError(f"{last}: its optimiser state does not fit {self.cfg.model} ({one_line(err)})") from None
        self.start_epoch, self.best_dsc, self.history = ckpt["epoch"] + 1, ckpt["best_val_dsc"], ckpt["history"]

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        cfg, (mean, std) = self.cfg, self.norm
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "model_name": cfg.model,
                "model_args": cfg.model_args, "preprocessing": {"resize_size": self.size, "mean": list(mean),
                                                                "std": list(std)},
                "epoch": epoch, "best_val_dsc": self.best_dsc, "select_split": self.select_split,
                "protocol": cfg.protocol, "config": dataclasses.asdict(cfg), "history": self.history}

    def end_epoch(self, epoch: int, lr: float, mean_loss: float, epoch_started: float) -> None:
        """Select on the selection split (every ``eval_every`` epochs and at the last), keep
        ``best.pt`` and ``last.pt``, append to ``log.csv`` and TensorBoard, print one line."""
        cfg, split = self.cfg, self.select_split
        row = {"epoch": epoch + 1, "lr": f"{lr:.6g}", "loss": f"{mean_loss:.6f}", "select_split": split,
               "select_dsc": "", "select_miou": "", "best_dsc": "", "seconds": ""}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            report, _ = evaluate(self.model, self.select, self.norm, batch_size=cfg.eval_batch_size,
                                 device=self.device, hd95=False, split=split)
            dsc, miou = report["pooled"]["dsc"], report["pooled"]["miou"]
            row.update(select_dsc=f"{dsc:.6f}", select_miou=f"{miou:.6f}")
            if dsc > self.best_dsc:
                self.best_dsc = dsc
                torch_save_atomic(self.checkpoint(epoch), self.run_dir / "best.pt")
            if self.writer is not None:
                self.writer.add_scalar(f"{split}/dsc", dsc, epoch + 1)
        row.update(best_dsc=f"{self.best_dsc:.6f}", seconds=f"{time.time() - epoch_started:.1f}")
        self.history.append(row)
        torch_save_atomic(self.checkpoint(epoch), self.run_dir / "last.pt")
        _write_log(self.run_dir / "log.csv", self.history)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", mean_loss, epoch + 1)
            self.writer.add_scalar("train/lr", lr, epoch + 1)
        print(f"epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} lr {lr:.2e} {split} "
              f"dsc {row['select_dsc'] or '-'} best {self.best_dsc:.4f} ({row['seconds']} s)", flush=True)


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Path:
    """Train as ``cfg`` says (or continue ``resume``); returns the run directory."""
    check_config(cfg)  # also for a TrainConfig built in Python, not only one from load_config
    from tqdm import tqdm

    from .data.loader import TrainLoader

    rank, world_size, device = _setup_distributed(cfg)
    master = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir, ckpt = _open_run(cfg, resume)
    fit, select, (mean, std) = _read_data(cfg, master)
    step_class, step_options = choose_step(cfg, device, world_size)  # the loader and optimiser depend on it
    loader = TrainLoader(fit, cfg.batch_size, mean, std, augment=cfg.augment, shuffle=True, seed=cfg.seed,
                         device=device, drop_last=step_class.drop_last, rank=rank, world_size=world_size,
                         robust_augment=cfg.robust_augment)
    if master:
        _make_run_dir(run_dir, cfg, fresh=resume is None)
    model, optimizer = _build_model(cfg, device, step_class.capturable, init=ckpt is None, norm=(mean, std))
    run = _Run(cfg, run_dir, device, model, optimizer, select, (mean, std), list(fit.images.shape[-2:]))
    if ckpt is not None:
        run.restore(ckpt)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model,
                                                          device_ids=[device.index] if device.type == "cuda" else None)
    # side outputs (EGE-UNet's deep supervision) enter the loss through this adapter
    loss_fn = ModelLoss(BceDiceLoss(cfg.bce_weight, cfg.dice_weight), deep_supervision_loss)
    step = step_class(model, loss_fn, optimizer, **step_options)

    run.writer = _tensorboard(run_dir) if master and cfg.tensorboard else None
    segment = _Segment(run_dir, cfg, run.start_epoch, resume is not None) if master else None
    stopped, tested, started = "interrupted", False, time.time()
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            t0, lr = time.time(), get_lr(epoch, cfg)
            step.set_lr(lr)
            loader.set_epoch(epoch)
            model.train()
            total_loss = torch.zeros((), device=device)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                       disable=not (master and cfg.progress))
            for i, (images, masks) in enumerate(bar):
                loss = step(images, masks)
                total_loss += loss
                if i % 20 == 0 or i == len(loader) - 1:  # .item() waits for the device: not every step
                    value = _from_rank0(loss.item(), device, world_size)
                    _check_finite(value, f"at epoch {epoch + 1}, step {i + 1}", run_dir)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            mean_loss = _from_rank0((total_loss / len(loader)).item(), device, world_size)
            _check_finite(mean_loss, f"in epoch {epoch + 1}", run_dir)
            if master:
                run.end_epoch(epoch, lr, mean_loss, epoch_started=t0)
            if _from_rank0(_budget_spent(cfg, started, epoch), device, world_size):
                stopped = "time budget"
                if master:
                    print(f"time budget of {cfg.max_minutes} min spent after epoch {epoch + 1} of {cfg.epochs}; "
                          f"stopped early, the test split was not read. Continue with: "
                          f"scsonet train --resume {run_dir}", flush=True)
                break
        else:
            stopped = "completed"
        step.close()  # before the test: the helpers' memory is not needed any more
        if master and stopped == "completed":  # test, read once, with the selected checkpoint
            final_test(run_dir, cfg, device)
            tested = True
    except BaseException as err:
        stopped = _stop_reason(err)
        raise
    finally:
        step.close()
        if segment is not None:
            segment.end(stopped, run.history, tested)
    if run.writer is not None:
        run.writer.close()
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
