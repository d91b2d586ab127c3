"""Experiment trackers for ``train.log_with``: accelerate's (TensorBoard, W&B, MLflow, ...) and a
CSV tracker of sdsurgery's own, all written through ``accelerator.log``.

Metric names: ``train/...`` every ``train.log_every_steps`` optimizer steps (loss, lr, drop rate,
images per second, the fraction of gated branch calls that ran), ``epoch/...`` once per epoch
(train loss, validation metrics, epoch time), ``test/...`` at the end; the step is the global
optimizer-update count. TensorBoard writes to ``RUN/tensorboard``, CSV to ``RUN/csv/<group>.csv``.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

from ..errors import SurgeryError, first_line

__all__ = ["TrackerError", "CsvTracker", "check_available", "create_trackers", "start_trackers", "flat_config"]

# tracker name -> (module to import, pip package)
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"), "aim": ("aim", "aim"), "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"), "trackio": ("trackio", "trackio"),
}


class TrackerError(SurgeryError):
    """A tracker the recipe names cannot be used here."""


def check_available(names: list[str]) -> None:
    """Every tracker in ``names`` is installed (accelerate would drop a missing one silently)."""
    for name in names:
        if name == "csv":
            continue
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"train.log_with: {name} needs the {package} package (pip install {package}), "
                               f"or drop it from train.log_with")


def _tracker_base():
    from accelerate.tracking import GeneralTracker
    return GeneralTracker


class CsvTracker(_tracker_base()):
    """One CSV file per metric group (``train``, ``epoch``, ``test``: the names' prefix), a column
    per metric and one for the step; resuming appends, after dropping rows past ``resumed_at``."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, directory: str | Path, resumed_at: int | None = None):
        super().__init__()
        self.directory, self.resumed_at = Path(directory), resumed_at
        self.columns: dict[str, list[str]] = {}

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob("*.csv"):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            self.columns[path.stem] = rows[0]
            if self.resumed_at is not None:
                try:
                    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= self.resumed_at]
                except ValueError as e:
                    raise TrackerError(f"{path} is not a CSV this tracker wrote ({e}); move it away") from e
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)

    def store_init_configuration(self, values: dict) -> None:
        pass  # the run directory's recipe.yaml holds it

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        groups: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            group, _, name = key.partition("/")
            groups.setdefault(group if name else "metrics", {})[name or key] = value
        for group, row in groups.items():
            path = self.directory / f"{group}.csv"
            header = self.columns.get(group)
            new = header is None
            if new:
                header = self.columns[group] = ["step", *row]
            unknown = set(row) - set(header)
            if unknown:
                raise TrackerError(f"{path}: metrics {sorted(unknown)} are not among its columns")
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(header)
                writer.writerow([step] + ["" if row.get(c) is None else row[c] for c in header[1:]])


def create_trackers(names: list[str], run_dir: Path, resumed_at: int | None = None) -> list:
    """accelerate tracker objects for ``names``: TensorBoard under ``run_dir/tensorboard``, the CSV
    tracker under ``run_dir/csv``, the others under the project name ``sdsurgery`` (those that keep
    files, under ``run_dir``). Resumed at update ``resumed_at``: the CSV rows and TensorBoard
    events past it are dropped (the resumed run logs those steps again)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    check_available(names)
    out = []
    for name in dict.fromkeys(names):
        if name == "csv":
            out.append(CsvTracker(run_dir / "csv", resumed_at))
        elif name == "wandb":  # its files (offline runs, logs) in the run directory, not the cwd
            out.append(LOGGER_TYPE_TO_CLASS[name]("sdsurgery", dir=str(run_dir)))
        elif name == "tensorboard":  # a resumed run hides the cut run's steps after its checkpoint
            purge = {} if resumed_at is None else {"purge_step": resumed_at + 1}
            out.append(LOGGER_TYPE_TO_CLASS[name]("tensorboard", str(run_dir), **purge))
        elif LOGGER_TYPE_TO_CLASS[name].requires_logging_directory:
            out.append(LOGGER_TYPE_TO_CLASS[name]("sdsurgery", str(run_dir)))
        else:
            out.append(LOGGER_TYPE_TO_CLASS[name]("sdsurgery"))
    return out


def start_trackers(names: list[str], run_dir: Path, resumed_at: int | None, config: dict[str, Any]) -> list:
    """``create_trackers``, each started and given the run's configuration, as
    ``accelerator.init_trackers`` does, one at a time so that a tracker failing to build or start
    (a tracking server out of reach, a missing login) is one line naming it; those already
    started are finished (also on Ctrl-C)."""
    started: list = []
    name = "a tracker"
    try:
        for tracker in create_trackers(names, run_dir, resumed_at):
            name = tracker.name
            tracker.start()
            started.append(tracker)
            tracker.store_init_configuration(config)
    except BaseException as e:
        for done in started:
            try:
                done.finish()
            except Exception:  # the error that stopped the start is the one to report
                pass
        if isinstance(e, TrackerError) or not isinstance(e, Exception):
            raise
        raise TrackerError(f"train.log_with: {name} did not start: {first_line(e, with_type=True)}; fix its "
                           f"settings (environment variables, login) or drop it from train.log_with") from e
    return started


def flat_config(recipe: dict) -> dict[str, Any]:
    """The recipe as ``section.key: value`` with scalar values (trackers' hyper-parameter tables
    take nothing else; lists and None become strings)."""
    out: dict[str, Any] = {}
    for section, values in recipe.items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else section
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out
