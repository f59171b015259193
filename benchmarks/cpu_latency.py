"""CPU latency of every registered model: milliseconds per image at batch 1, images per second at
batch 8, on a square input (256), with a fixed number of threads (2). Prints a Markdown table;
``--out FILE`` also writes the command and its output there (the saved outputs in docs/benchmarks/).

    .venv/bin/python benchmarks/cpu_latency.py
    .venv/bin/python benchmarks/cpu_latency.py --models scsonet,egeunet --repeats 30
    .venv/bin/python benchmarks/cpu_latency.py --models scsonet --threads 2,1 --clock wall,cpu

Each figure is the median (``--stat min``: the fastest) of ``--repeats`` timed calls after
``--warmup`` untimed ones, in eval mode under ``torch.inference_mode``. Within a backend and batch
size the timed calls go round-robin over all models, so a burst of other work on the machine
slows every model alike instead of one of them; on a busy machine the minimum is the steadier
figure. Backends and batch sizes are timed one after another, not interleaved: ONNX Runtime's
worker threads spin for a while after each run and would take the cores from a run that
follows (each batch size has its own session), and a batch-8 call evicts the caches a batch-1
call in a stream of single images would find warm.

A backend is a function ``(model, x) -> runner``, the runner a zero-argument callable that does
one forward pass on ``x`` (or None where the backend cannot run that model). ``onnxruntime``
exports the model with ``scsonet export`` and runs it through the sessions of ``scsonet predict
--backend onnxruntime`` (exact, float32; the graph of ``scsonet.deploy.reparameterize``, as ``scsonet
export`` writes it); ``onnxruntime-plain`` exports the model's own graph (``--no-reparameterize``);
``onnxruntime-int8`` is the ``--quantize int8`` model, calibrated on the shipped sample images.
Each non-torch backend also gets a speed-up column: torch eager ms/image over its own, at batch 1,
from the same run.

``--clock cpu`` times with ``time.process_time`` (CPU seconds of this process) instead of the wall
clock: with ``--threads 1`` a figure that other work on the machine disturbs much less.
``--threads`` takes several counts, one table each, and ``--clock`` one clock for all of them or
one per count.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import platform
import shlex
import statistics
import time
from typing import Callable, Hashable

import torch
import torch.nn as nn

from scsonet._io import write_text_atomic
from scsonet.complexity import count_params
from scsonet.models import LoadedModel, create_model, list_models
from scsonet.transforms import SegmentationPreset

Runner = Callable[[], object]
Backend = Callable[[nn.Module, torch.Tensor], Runner]
BATCH_SIZES = (1, 8)
STATS = {"median": statistics.median, "min": min}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def torch_eager(model: nn.Module, x: torch.Tensor) -> Runner:
    model.eval()

    def run():
        with torch.inference_mode():
            return model(x)

    return run


def onnxruntime_backend(quantize: str | None = None, reparameterize: bool = True) -> Backend:
    """Export each model once (per input size) and time ``OrtSegmenter.logits`` on ``x``, in a session
    with torch's current thread count (one session per count)."""
    from scsonet.export import export_onnx
    from scsonet.inference import sample_images
    from scsonet.onnx_runtime import OrtSegmenter

    folder = tempfile.TemporaryDirectory(prefix="cpu_latency_onnx_")
    exports: dict[tuple[int, tuple[int, ...]], str | None] = {}
    segmenters: dict[tuple[str, int], OrtSegmenter] = {}

    def make(model: nn.Module, x: torch.Tensor) -> Runner | None:
        key = (id(model), tuple(x.shape[2:]))
        if key not in exports:
            loaded = LoadedModel(model, SegmentationPreset(tuple(x.shape[2:])), type(model).__name__, "random init")
            exports[key] = os.path.join(folder.name, f"{id(model)}_{len(exports)}.onnx")
            try:
                export_onnx(loaded, exports[key], check=False, quantize=quantize, calibration_images=sample_images(),
                            reparameterize=reparameterize)
            except Exception as err:  # a peer model the exporter cannot handle: leave its cells empty
                print(f"note: {type(model).__name__}: no ONNX Runtime figure ({type(err).__name__}: {err})",
                      file=sys.stderr)
                exports[key] = None
        if exports[key] is None:
            return None
        session_key = (exports[key], torch.get_num_threads())
        if session_key not in segmenters:
            segmenters[session_key] = OrtSegmenter(exports[key], threads=session_key[1])
        segmenter, array = segmenters[session_key], x.numpy()
        return lambda: segmenter.logits(array)

    make.folder = folder  # keep the exported files alive as long as the backend
    return make


BACKENDS: dict[str, Callable[[], Backend]] = {
    "torch": lambda: torch_eager,
    "onnxruntime": onnxruntime_backend,
    "onnxruntime-plain": lambda: onnxruntime_backend(reparameterize=False),
    "onnxruntime-int8": lambda: onnxruntime_backend("int8"),
}


def interleaved_timings(runners: dict[Hashable, Runner], warmup: int, repeats: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[Hashable, list[float]]:
    """Seconds (by ``clock``) of ``repeats`` calls of each runner, timing them in turn, one call a round."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[Hashable, list[float]] = {key: [] for key in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            start = clock()
            run()
            times[key].append(clock() - start)
    return times


def latency_table(
    models: dict[str, nn.Module], backends: dict[str, Backend], size: int, warmup: int, repeats: int,
    stat: str = "median", clock: str = "wall",
) -> list[dict]:
    """One row per model: parameters, then per backend ms/image at batch 1 and images/s at batch 8."""
    torch.manual_seed(0)
    inputs = {b: torch.randn(b, 3, size, size) for b in BATCH_SIZES}
    runners = {
        (name, backend, b): make(model, inputs[b])
        for name, model in models.items()
        for backend, make in backends.items()
        for b in BATCH_SIZES
    }
    seconds = {}
    for backend in backends:
        for b in BATCH_SIZES:
            mine = {key: run for key, run in runners.items() if key[1:] == (backend, b) and run is not None}
            timings = interleaved_timings(mine, warmup, repeats, CLOCKS[clock])
            seconds.update((key, STATS[stat](t)) for key, t in timings.items())
    rows = []
    for name, model in models.items():
        row = {"model": name, "params": count_params(model)}
        for backend in backends:
            row[f"{backend} ms/image (b1)"] = 1000 * seconds.get((name, backend, 1), math.nan)
            row[f"{backend} images/s (b8)"] = 8 / seconds.get((name, backend, 8), math.nan)
        for backend in backends:
            if backend != "torch" and "torch" in backends:
                row[f"{backend} speed-up (b1)"] = row["torch ms/image (b1)"] / row[f"{backend} ms/image (b1)"]
        rows.append(row)
    return rows


def format_markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    for row in rows:
        cells = [row["model"], f"{row['params']:,}"] + [f"{row[c]:.2f}" if "speed-up" in c else f"{row[c]:.1f}"
                                                          for c in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated names (all registered models)")
    p.add_argument("--size", type=int, default=256, help="square input side (256)")
    p.add_argument("--threads", default="2", help="torch intra-op threads; comma-separated: one table per count (2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model and batch size (10)")
    p.add_argument("--stat", choices=sorted(STATS), default="median", help="statistic of the timed calls (median)")
    p.add_argument("--clock", default="wall",
                   help="wall time, or cpu: CPU time of the process (steadier on a busy machine with --threads 1); "
                        "comma-separated: one per --threads count (wall)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)} (all)")
    p.add_argument("--out", help="also write the command and its output to this Markdown file")
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    clocks = args.clock.split(",")
    if unknown := sorted(set(clocks) - set(CLOCKS)):
        p.error(f"unknown clocks {unknown}; choose from {', '.join(CLOCKS)}")
    if len(clocks) == 1:
        clocks *= len(threads)
    elif len(clocks) != len(threads):
        p.error(f"--clock gives {len(clocks)} clocks for {len(threads)} thread counts: give one, or one per count")
    names = [n for n in args.models.split(",") if n] or list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        p.error(f"unknown models {unknown}; registered: {', '.join(list_models())}")
    chosen = [b for b in args.backends.split(",") if b]
    if unknown := sorted(set(chosen) - set(BACKENDS)):
        p.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    torch.manual_seed(0)
    models = {name: create_model(name).eval() for name in names}
    backends = {b: BACKENDS[b]() for b in chosen}  # each exports a model once, for every table
    tables = []
    for count, clock in zip(threads, clocks):
        torch.set_num_threads(count)  # ONNX Runtime sessions take the count as they are made
        rows = latency_table(models, backends, args.size, args.warmup, args.repeats, args.stat, clock)
        load = os.getloadavg()[0]  # other work on the machine inflates every figure: report it
        tables.append(
            f"CPU latency ({clock} clock) at {args.size}x{args.size}, {count} threads, {args.stat} of {args.repeats} "
            f"after {args.warmup} warm-up calls; torch {torch.__version__}, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {load:.1f} at the end\n\n{format_markdown(rows)}\n"
        )
        print(tables[-1], flush=True)
    if args.out:
        command = shlex.join(["python", "benchmarks/cpu_latency.py", *(sys.argv[1:] if argv is None else argv)])
        write_text_atomic(args.out, f"```\n$ {command}\n```\n\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
