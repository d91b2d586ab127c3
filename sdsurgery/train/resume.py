"""Resumable training state in files that cannot carry code: safetensors and JSON.

accelerate's ``save_state`` / ``load_state`` pickle the registered objects (``load_state``
reads ``custom_checkpoint_N.pkl`` with ``weights_only=False``), so a planted file in a run
directory would run code on ``--resume``. sdsurgery writes its own checkpoint directories
instead, and reads nothing else from them:

* ``model.safetensors``: the model's state_dict (the original architecture's keys);
* ``state.safetensors``: every tensor of the optimizer, scheduler, gate generator and AMP scaler;
* ``rng_R.safetensors`` / ``rng_R.json``: rank R's torch, CUDA, Python and NumPy RNG states;
* ``state.json``: the loop's counters and the structure of the other states, with tensors
  referred to by key (``{"$tensor": "optimizer/3"}``). Written last: a directory without it
  is incomplete and never resumed from.

A checkpoint is written to ``NAME.tmp`` and renamed into place, so a crash never leaves a
half-written ``NAME``; replacing an existing ``NAME`` (``best``) renames it to ``NAME.old``
first, and :func:`tidy` finishes an interrupted swap.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import CheckpointError
from ..errors import first_line

__all__ = ["CHECKPOINTS", "checkpoints", "flatten", "unflatten", "prune", "read", "tidy", "write",
           "capture_rng", "restore_rng"]

FORMAT = 1
CHECKPOINTS = "checkpoints"
STATE = "state.json"
_TAGS = ("$tensor", "$items", "$tuple", "$float")


# ------------------------------------------------------------------ code-free serialisation
def flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` (nested dicts / lists / tuples of tensors and plain values, as state_dicts are)
    as JSON; its tensors go into ``tensors`` under keys starting with ``prefix``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}/{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"$tensor": key}
    if isinstance(obj, dict):
        for k in obj:
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise TypeError(f"cannot store a state key of type {type(k).__name__}")
        return {"$items": [[k, flatten(v, prefix, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [flatten(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, prefix, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # numpy scalars
        return flatten(obj.item(), prefix, tensors)
    raise TypeError(f"cannot store a value of type {type(obj).__name__} in a checkpoint")


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten`; anything but the four tags and plain JSON is an error."""
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if len(tree) != 1 or next(iter(tree)) not in _TAGS:
            raise ValueError(f"unexpected object with keys {sorted(tree)[:3]}")
        tag, value = next(iter(tree.items()))
        if tag == "$tensor":
            if value not in tensors:
                raise ValueError(f"tensor {value!r} is missing")
            return tensors[value]
        if tag == "$tuple":
            return tuple(unflatten(v, tensors) for v in value)
        if tag == "$float":
            if value not in ("inf", "-inf", "nan"):
                raise ValueError(f"bad float {value!r}")
            return float(value)
        if not all(isinstance(p, list) and len(p) == 2 for p in value):
            raise ValueError("bad mapping")
        return {k: unflatten(v, tensors) for k, v in value}
    return tree


# --------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy random states."""
    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# -------------------------------------------------------------------------- directories
def checkpoint_key(p: Path) -> tuple[int, int] | None:
    """``epoch_E`` (E epochs done) or ``epoch_E_step_S`` (E done, S steps into the next)."""
    parts = p.name.split("_")
    if len(parts) == 2 and parts[0] == "epoch" and parts[1].isdigit():
        return int(parts[1]), 0
    if len(parts) == 4 and parts[0] == "epoch" and parts[2] == "step" and parts[1].isdigit() and parts[3].isdigit():
        return int(parts[1]), int(parts[3])
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories in training order (``best`` is not one of them)."""
    ck = Path(run_dir) / CHECKPOINTS
    if not ck.is_dir():
        return []
    found = [p for p in ck.iterdir() if p.is_dir() and checkpoint_key(p) is not None]
    return sorted(found, key=checkpoint_key)


def prune(run_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` (at least 1) checkpoints."""
    for old in checkpoints(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old)


def tidy(run_dir: Path) -> list[str]:
    """Finish or undo swaps a crash interrupted and remove partial directories; returns what
    was done, one line each."""
    ck = Path(run_dir) / CHECKPOINTS
    done: list[str] = []
    if not ck.is_dir():
        return done
    for tmp in sorted(ck.glob("*.tmp")):
        final = tmp.with_suffix("")
        if not final.exists() and (tmp / STATE).is_file():
            os.replace(tmp, final)
            done.append(f"completed {final.name} from {tmp.name}")
        else:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            done.append(f"removed the partial {tmp.name}")
    for old in sorted(ck.glob("*.old")):
        final = old.with_suffix("")
        if not final.exists():
            os.replace(old, final)
            done.append(f"restored {final.name}")
        else:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return done


# ------------------------------------------------------------------------ write and read
def write(directory: Path, *, model: torch.nn.Module | None, states: dict[str, Any],
          loop: dict[str, Any], rng: dict[str, Any], rank: int, main: bool, barrier=lambda: None,
          model_metadata: dict[str, str] | None = None) -> None:
    """Write one checkpoint directory (see the module docstring). Every rank calls this;
    ``main`` writes the shared files, each rank its RNG state; ``barrier`` waits for all ranks.
    ``model_metadata`` goes into ``model.safetensors``'s header (sdsurgery's checkpoint
    metadata makes it a file ``sdsurgery.load`` and ``eval`` read).

    Raises CheckpointError (one line) when the files cannot be written, after removing the
    partial directory; an existing checkpoint of the same name is kept in that case."""
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    try:
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        rng_tensors: dict[str, torch.Tensor] = {}
        rng_tree = flatten(rng, "rng", rng_tensors)
        save_file(rng_tensors, str(tmp / f"rng_{rank}.safetensors"))
        (tmp / f"rng_{rank}.json").write_text(json.dumps(rng_tree))
        if main:
            save_model(model, str(tmp / "model.safetensors"), metadata=model_metadata)
            tensors: dict[str, torch.Tensor] = {}
            trees = {name: flatten(s, name, tensors) for name, s in states.items()}
            save_file(tensors, str(tmp / "state.safetensors"))
        barrier()
        if main:
            # state.json last: its presence marks the directory complete
            (tmp / STATE).write_text(json.dumps({"format": FORMAT, "loop": loop, "states": trees},
                                                allow_nan=False))
            if directory.exists():  # rename into place, then remove the old one (tidy() recovers)
                old = directory.with_name(directory.name + ".old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old)
            else:
                os.replace(tmp, directory)
        barrier()
    except Exception as e:  # disk full, permissions; safetensors raises its own error type
        _remove(tmp)
        raise CheckpointError(f"cannot write checkpoint {directory}: {first_line(e, with_type=True)}") from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Checkpoint:
    """A checkpoint directory read into memory and checked; nothing is applied yet."""

    def __init__(self, directory: Path, model: dict[str, torch.Tensor], states: dict[str, Any],
                 loop: dict[str, Any], rng: dict[str, Any] | None):
        self.directory, self.model, self.states, self.loop, self.rng = directory, model, states, loop, rng


def read(directory: Path, rank: int) -> Checkpoint:
    """Read a checkpoint written by :func:`write`. Only safetensors and JSON are opened; any
    other file in the directory is ignored. Raises CheckpointError naming the first problem."""
    from safetensors.torch import load_file

    directory = Path(directory)
    where = f"{directory.parent.name}/{directory.name}"
    if not (directory / STATE).is_file():
        legacy = any(directory.glob("*.pkl")) or any(directory.glob("*.bin"))
        raise CheckpointError(
            f"{where} has no {STATE}: " + ("it was written with pickles by an older sdsurgery "
                                           "(accelerate's save_state) and cannot be resumed safely"
                                           if legacy else "it is incomplete"))
    try:
        head = json.loads((directory / STATE).read_text())
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise ValueError(f"format {head.get('format') if isinstance(head, dict) else head!r}")
        loop = head["loop"]
        if not isinstance(loop, dict):
            raise ValueError("loop state is not an object")
        model = load_file(str(directory / "model.safetensors"))
        tensors = load_file(str(directory / "state.safetensors"))
        if not isinstance(head["states"], dict):
            raise ValueError("states is not an object")
        states = {k: unflatten(v, tensors) for k, v in head["states"].items()}
    except Exception as e:  # noqa: BLE001 - every way a file can be damaged ends here
        raise CheckpointError(f"{where} is unreadable ({first_line(e, with_type=True)})") from e
    rng = None
    try:
        rng_tensors = load_file(str(directory / f"rng_{rank}.safetensors"))
        rng = unflatten(json.loads((directory / f"rng_{rank}.json").read_text()), rng_tensors)
    except Exception:  # noqa: BLE001 - RNG state is optional (another number of processes)
        rng = None
    return Checkpoint(directory, model, states, loop, rng)
