"""Training speed on the CPU: images per second of a full step (forward, backward, AdamW step) of
SCSONet run plainly (eager, float32, channels-first, no compilation) and on the fast path that
``scsonet train`` takes (``scsonet.fast`` re-expressions and fused AdamW, the batch split among
one single-threaded process per thread by ``scsonet.parallel``), measured in the same run.
Prints a Markdown table.

    .venv/bin/python benchmarks/train_speed.py
    .venv/bin/python benchmarks/train_speed.py --threads 2 --batch-size 8 --size 256 --rounds 8

Each row runs in its own worker process, because part of the fast path is process-wide (the
memory allocator; OpenMP's spin count, which must be set before torch loads): the plain row is
what a user gets without any of it. The middle rows add the process settings, then the model
re-expressions (in one process with all the threads), to show what each part adds. The
workers take turns, a few steps each per round in alternating order, so that load from other
jobs on the machine falls on all rows alike; each turn starts with one untimed step (caches
are cold after the other rows' turns). Each row reports its median step and its best step
(the best is the closer guess for a machine without other jobs). All rows start from the same
weights; the last column is the largest difference of their first logits from the plain row's.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from multiprocessing.connection import Connection

import torch

from scsonet._io import write_text_atomic
from scsonet.fast import RUNTIME_ENV, optimizer_options, prepare_for_training, tune_cpu_allocator
from scsonet.losses import BceDiceLoss
from scsonet.models import create_model
from scsonet.parallel import ModelLoss, SplitBatchStep

# label -> (setup of the worker, its extra environment); the first row is the baseline
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "plain (eager, float32, channels-first)": ("plain", {}),
    "plain + process settings": ("settings", RUNTIME_ENV),
    "+ re-expressions, fused AdamW (one process)": ("fast", RUNTIME_ENV),
    "fast: + batch split over one-thread processes": ("split", RUNTIME_ENV),
}


def _worker(conn: Connection, setup: str, model_name: str, threads: int, batch_size: int, size: int) -> None:
    """Build one row's model, send its logits on a fixed batch, then run steps on request (0 ends)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name).train()
    fast = setup in ("fast", "split")
    if setup == "settings":
        tune_cpu_allocator()
    elif fast:
        model = prepare_for_training(model, "cpu")
    options = optimizer_options("cpu") if fast else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, **options)
    loss_fn = ModelLoss(BceDiceLoss())
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    masks = (torch.rand(batch_size, 1, size, size, generator=g) > 0.5).float()
    conn.send(model(images).detach())  # with autograd on, as in training
    split = SplitBatchStep(model, loss_fn, min(threads, batch_size)) if setup == "split" and threads > 1 else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if split is not None:
            split(images, masks)
        else:
            loss_fn(model, images, masks).backward()
        optimizer.step()

    while steps := conn.recv():
        step()  # untimed: the first step of a turn finds caches cold after the other rows' turns
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        conn.send(times)
    if split is not None:
        split.close()


def measure(
    rows: dict[str, tuple[str, dict[str, str]]], model_name: str, threads: int, batch_size: int, size: int,
    warmup: int, rounds: int, steps: int,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per row: the seconds of every timed step, and the largest logit difference from the first row."""
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for label, (setup, env) in rows.items():
        parent, child = ctx.Pipe()
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in env.items() if k not in saved})  # the user's settings win
        # not a daemon: the split row starts processes of its own
        proc = ctx.Process(target=_worker, args=(child, setup, model_name, threads, batch_size, size))
        proc.start()  # the child copies the environment now
        os.environ.clear()
        os.environ.update(saved)
        conns[label] = parent
        procs.append(proc)
    logits = {label: conn.recv() for label, conn in conns.items()}
    base = next(iter(logits.values()))
    diffs = {label: (out - base).abs().max().item() for label, out in logits.items()}
    for conn in conns.values():  # warm up one at a time: workers never run together
        conn.send(warmup)
        conn.recv()
    times = {label: [] for label in rows}
    for r in range(rounds):
        for label in list(rows) if r % 2 == 0 else list(reversed(rows)):
            conns[label].send(steps)
            times[label] += conns[label].recv()
    for conn in conns.values():
        conn.send(0)
    for proc in procs:
        proc.join()
    return times, diffs


def format_table(times: dict[str, list[float]], diffs: dict[str, float], batch_size: int) -> str:
    """Median and best step per row; the best approximates a machine without other jobs."""
    base_median, base_best = statistics.median(next(iter(times.values()))), min(next(iter(times.values())))
    lines = [
        "| variant | ms/batch | ms/image | images/s | speed-up | best ms/batch | best speed-up | max abs logit diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, ts in times.items():
        median, best = statistics.median(ts), min(ts)
        lines.append(
            f"| {label} | {1000 * median:.1f} | {1000 * median / batch_size:.1f} | {batch_size / median:.1f}"
            f" | {base_median / median:.2f}x | {1000 * best:.1f} | {base_best / best:.2f}x | {diffs[label]:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="scsonet", help="registered model name (scsonet)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads per worker (2)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (8)")
    p.add_argument("--size", type=int, default=256, help="square input side (256)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (3)")
    p.add_argument("--rounds", type=int, default=6, help="turns per row (6)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per turn (3)")
    p.add_argument("--repeats", type=int, default=1,
                   help="whole measurements, each with fresh worker processes, pooled (1)")
    p.add_argument("--out", help="also write the command and its output to this Markdown file")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {label: [] for label in ROWS}
    speedups = []
    for _ in range(args.repeats):
        run_times, diffs = measure(
            ROWS, args.model, args.threads, args.batch_size, args.size, args.warmup, args.rounds, args.steps
        )
        medians = [statistics.median(ts) for ts in run_times.values()]
        speedups.append(medians[0] / medians[-1])
        for label, ts in run_times.items():
            times[label] += ts
    report = (
        f"{args.model} training step, batch {args.batch_size}, {args.size}x{args.size}, {args.threads} threads, "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end; median of {args.repeats * args.rounds * args.steps} "
        f"steps per row\n\n{format_table(times, diffs, args.batch_size)}\n"
    )
    if args.repeats > 1:
        report += (f"\nSpeed-up of the last row over the first in each of the {args.repeats} measurements: "
                   f"{', '.join(f'{x:.2f}x' for x in speedups)}.\n")
    print(report, end="")
    if args.out:
        command = " ".join(["python benchmarks/train_speed.py", *(argv if argv is not None else sys.argv[1:])])
        write_text_atomic(args.out, f"```\n$ {command}\n```\n\n{report}")


if __name__ == "__main__":
    main()
