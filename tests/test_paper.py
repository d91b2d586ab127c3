"""benchmarks/paper.py --quick: the paper experiment's plumbing (both settings, seeds, timing,
first-layer gradients, table, plots) on the bundled digits, in seconds."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def paper():
    spec = importlib.util.spec_from_file_location("paper_experiment", ROOT / "benchmarks" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_both_settings(tmp_path, paper):
    pytest.importorskip("matplotlib")
    assert paper.run(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    runs = result["runs"]
    assert sorted((r["setting"], r["seed"]) for r in runs) == [
        ("constant depth", 0), ("constant depth", 1), ("stochastic depth", 0), ("stochastic depth", 1)]
    for r in runs:
        assert len(r["epoch_seconds"]) == 2 and len(r["grad_first_conv"]) == 2
        assert all(g > 0 and math.isfinite(g) for g in r["grad_first_conv"])
        assert 0 <= r["test_error"] <= 100
        meta = json.loads((Path(r["run_dir"]) / "result.json").read_text())
        assert meta["folded"]["top1"] == pytest.approx(100 - r["test_error"])
    # the stochastic-depth runs really had gates; the constant-depth ones none
    recipes = {r["setting"]: (Path(r["run_dir"]) / "recipe.yaml").read_text() for r in runs}
    assert "enabled: true" in recipes["stochastic depth"].split("stochastic_depth:")[1].split("train:")[0]
    assert "enabled: false" in recipes["constant depth"].split("stochastic_depth:")[1].split("train:")[0]
    summary = (tmp_path / "summary.md").read_text()
    assert "| ResNet-20 |" in summary and f"{result['theory']['20']:.3f}" in summary
    for name in ("error", "epoch_time", "gradients"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_real_data_is_one_line(tmp_path, paper, capsys):
    assert paper.run(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cifar10 not found in") and err.count("\n") == 1
