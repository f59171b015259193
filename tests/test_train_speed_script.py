"""benchmarks/train_speed.py runs end to end (tiny sizes) and writes its Markdown table."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_speed_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "train_speed.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--size", "32", "--batch-size", "4",
           "--warmup", "1", "--rounds", "1", "--steps", "1", "--repeats", "2", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("```\n$ python benchmarks/train_speed.py --size 32")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 5  # header and the four variants
    assert "batch split over one-thread processes" in rows[-1]
    assert "in each of the 2 measurements" in text
