"""Run directories: one run per directory (an OS lock), metrics that stay valid JSON."""
import json
import os

import pytest

from sdsurgery.train import rundir


def test_a_second_run_gets_its_own_directory_while_the_first_holds_one(tmp_path):
    first, n1 = rundir.claim(tmp_path / "run", resume=False)
    second, n2 = rundir.claim(tmp_path / "run", resume=False)  # run is empty but locked
    assert (n1, n2) == (1, 2) and second.directory == tmp_path / "run-2"
    with pytest.raises(rundir.RunDirError, match=f"run directory .*run is in use by another sdsurgery run \\(PID {os.getpid()}\\)"):
        rundir.claim(tmp_path / "run", resume=True)
    first.release()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    third, n3 = rundir.claim(tmp_path / "run", resume=False)  # run holds a run now; run-2 is locked
    assert n3 == 3
    for lock in (second, third):
        lock.release()
    again, _ = rundir.claim(tmp_path / "run", resume=True)
    assert again.crashed_pid is None  # released cleanly
    again.release()


def test_a_crashed_holder_is_noticed_and_its_lock_is_free(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rundir.LOCK).write_text("424242\n")  # what a killed run leaves behind
    lock, n = rundir.claim(tmp_path / "run", resume=True)
    assert n == 1 and lock.crashed_pid == 424242
    assert (tmp_path / "run" / rundir.LOCK).read_text() == f"{os.getpid()}\n"
    lock.release()


def test_metrics_are_valid_json_and_truncated_on_resume(tmp_path):
    for epoch in (1, 2, 3):
        rundir.append_metrics(tmp_path, {"epoch": epoch, "train_loss": float("nan"), "eval_loss": float("inf")})
    (tmp_path / rundir.METRICS).open("a").write('{"epoch": 4, "train_lo')  # killed mid-line
    lines = (tmp_path / rundir.METRICS).read_text().splitlines()
    assert json.loads(lines[0]) == {"epoch": 1, "train_loss": None, "eval_loss": None}
    assert rundir.truncate_metrics(tmp_path, 2) == 2
    assert [json.loads(l)["epoch"] for l in (tmp_path / rundir.METRICS).read_text().splitlines()] == [1, 2]
