"""Build the model the web page serves (web/model/scsonet.onnx) with `scsonet export`, and check it.

    .venv/bin/python scripts/web_model.py            # export when missing or stale, else do nothing
    .venv/bin/python scripts/web_model.py --check    # exit 1 when missing or stale (what the build runs)

A sidecar, web/model/scsonet.json, records the SHA-256 of the shipped weights, of the parts of the
model card that the export reads (architecture, model arguments, preprocessing, threshold), of the
reliability model shipped beside the weights (which the export embeds in the metadata, key
``reliability``; the page's review mark comes from it), and of the ONNX file itself; the model is
stale when any of them differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "web" / "model"
WEIGHTS = "scsonet-isic2017"
# The export the page serves; `--no-reparameterize` or not is chosen by benchmarks/browser_latency.mjs.
EXPORT_ARGS = ["--no-reparameterize"]
CARD_KEYS = ("arch", "model_args", "preprocessing", "threshold")  # what `scsonet export` takes from the card


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources(weights: str = WEIGHTS) -> dict[str, str]:
    """SHA-256 of the weights file, of the model card's fields that an export of ``weights`` reads
    (so that an edit of the card's prose does not make the model stale), and of the reliability
    model's JSON (None when the weights ship none)."""
    from scsonet.models._loading import PRETRAINED
    from scsonet.reliability import default_model_path

    member = PRETRAINED[weights]
    card = json.loads(member.value.card_path.read_text())
    fields = json.dumps({key: card.get(key) for key in CARD_KEYS}, sort_keys=True).encode()
    reliability = default_model_path(member.path)
    return {"weights_file": member.path.name, "weights_sha256": sha256(member.path),
            "card_export_sha256": hashlib.sha256(fields).hexdigest(),
            "reliability_sha256": sha256(reliability) if reliability.is_file() else None}


def sidecar_problems(model: Path, sidecar: Path, export_args: list[str],
                     expected: dict[str, str] | None = None, weights: str = WEIGHTS) -> list[str]:
    """Why ``model`` does not match what its ``sidecar`` and the shipped ``weights`` say (empty:
    fresh). Shared with scripts/shipped_onnx.py."""
    if not model.is_file() or not sidecar.is_file():
        return [f"{model} or {sidecar.name} is missing"]
    try:
        recorded = json.loads(sidecar.read_text())
    except ValueError as err:
        return [f"{sidecar}: not JSON ({err})"]
    expected = sources(weights) if expected is None else expected
    found = [f"{sidecar}: {key} is {recorded.get(key)!r}, the shipped file's is {value!r}"
             for key, value in expected.items() if recorded.get(key) != value]
    if recorded.get("onnx_sha256") != sha256(model):
        found.append(f"{model} is not the file that {sidecar.name} describes (onnx_sha256 differs)")
    if recorded.get("export_args") != export_args:
        found.append(f"{sidecar}: exported with {recorded.get('export_args')}, expected {export_args}")
    return found


def export_with_sidecar(model: Path, sidecar: Path, export_args: list[str], command: str,
                        weights: str = WEIGHTS) -> None:
    """``scsonet export`` of the shipped ``weights`` into ``model``, then its sidecar of hashes."""
    from scsonet._io import write_json_atomic

    model.parent.mkdir(parents=True, exist_ok=True)
    scsonet = Path(sys.executable).with_name("scsonet")
    subprocess.run([str(scsonet), "export", "--weights", weights, "--format", "onnx", *export_args,
                    "--out", str(model)], check=True)
    write_json_atomic(sidecar, {**sources(weights), "onnx_sha256": sha256(model), "export_args": export_args,
                                "command": command})


def problems(out_dir: Path = OUT_DIR, expected: dict[str, str] | None = None) -> list[str]:
    """Why the model in ``out_dir`` cannot be served as it is (empty: it is fresh)."""
    return sidecar_problems(out_dir / "scsonet.onnx", out_dir / "scsonet.json", EXPORT_ARGS, expected)


def build(out_dir: Path = OUT_DIR) -> None:
    export_with_sidecar(out_dir / "scsonet.onnx", out_dir / "scsonet.json", EXPORT_ARGS,
                        f"scsonet export --weights {WEIGHTS} --format onnx {' '.join(EXPORT_ARGS)}".strip())


def check_or_build(tool: str, fix: str, model: Path, problems: Callable[[], list[str]],
                   build: Callable[[], None], check: bool, force: bool) -> int:
    """The step both scripts run: with ``check``, report what is stale (exit 1); else rebuild
    what is stale (or everything with ``force``), 2 when still stale after the build, 0 fresh.
    Shared with scripts/shipped_onnx.py."""
    found = problems()
    if check:
        for line in found:
            print(f"{tool}: stale: {line}; run `{fix}`", file=sys.stderr)
        return 1 if found else 0
    if found or force:
        build()
        left = problems()
        if left:
            print(f"{tool}: error: {left[0]}", file=sys.stderr)
            return 2
    print(f"{tool}: {model} is fresh")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when missing or stale")
    parser.add_argument("--force", action="store_true", help="export even when fresh")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="(web/model)")
    args = parser.parse_args(argv)
    return check_or_build("web_model", "bash scripts/web_model", args.out_dir / "scsonet.onnx",
                          lambda: problems(args.out_dir), lambda: build(args.out_dir), args.check, args.force)


if __name__ == "__main__":
    sys.exit(main())
