"""CPU latency of every registered model: milliseconds per image at batch 1, images per second at
batch 8, on a square input (256), with a fixed number of threads (2). Prints a Markdown table.

    .venv/bin/python benchmarks/cpu_latency.py
    .venv/bin/python benchmarks/cpu_latency.py --models scsonet,egeunet --repeats 30

Each figure is the median over ``--repeats`` timed calls after ``--warmup`` untimed ones, in eval
mode under ``torch.inference_mode``. A backend is a function ``(model, x, warmup, repeats) ->
seconds per call``; another runtime (ONNX Runtime, say) becomes a column pair by adding one such
function to ``BACKENDS``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from scsonet.complexity import count_params
from scsonet.models import create_model, list_models

Backend = Callable[[nn.Module, torch.Tensor, int, int], list[float]]


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def torch_eager(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    model.eval()
    with torch.inference_mode():
        return time_calls(lambda: model(x), warmup, repeats)


BACKENDS: dict[str, Backend] = {"torch": torch_eager}


def measure(name: str, backends: dict[str, Backend], size: int, warmup: int, repeats: int) -> dict:
    """One table row: parameters, then per backend ms/image at batch 1 and images/s at batch 8."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    row = {"model": name, "params": count_params(model)}
    for backend, run in backends.items():
        b1 = statistics.median(run(model, torch.randn(1, 3, size, size), warmup, repeats))
        b8 = statistics.median(run(model, torch.randn(8, 3, size, size), warmup, repeats))
        row[f"{backend} ms/image (b1)"] = 1000 * b1
        row[f"{backend} images/s (b8)"] = 8 / b8
    return row


def format_markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    for row in rows:
        cells = [row["model"], f"{row['params']:,}"] + [f"{row[c]:.1f}" for c in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated names (all registered models)")
    p.add_argument("--size", type=int, default=256, help="square input side (256)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls; the median is reported (10)")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n] or list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        p.error(f"unknown models {unknown}; registered: {', '.join(list_models())}")
    torch.set_num_threads(args.threads)
    rows = [measure(n, BACKENDS, args.size, args.warmup, args.repeats) for n in names]
    load = os.getloadavg()[0]  # other work on the machine inflates every figure: report it
    print(f"CPU latency at {args.size}x{args.size}, {args.threads} threads, median of {args.repeats} after "
          f"{args.warmup} warm-up calls; torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the end\n")
    print(format_markdown(rows))


if __name__ == "__main__":
    main()
