"""benchmarks/gpu.sh runs first time on a GPU machine: here its CPU path at toy sizes, the same
commands and table."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_on_cpu_and_writes_its_table(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), MODELS="resnet18",
               SDSURGERY=str(Path(sys.executable).with_name("sdsurgery")), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(runs) == {"resnet18-eager.json", "resnet18-compiled.json"}
    assert runs["resnet18-compiled.json"]["compile"] == "eager" and runs["resnet18-eager.json"]["compile"] is None
    assert all(r["channels_last"] and r["device"] == "cpu" for r in runs.values())
    table = (tmp_path / "gpu.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| timm:resnet18")]
    assert len(rows) == 2 and table[2].startswith("| model |")
    compiled = next(r for r in rows if "compiled (eager)" in r).split(" | ")
    assert compiled[-1].rstrip(" |") == "0"  # no graph compiled after warm-up


def test_table_refuses_an_empty_directory(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no *.json" in done.stderr and "Traceback" not in done.stderr
