"""sdsurgery: give existing residual networks stochastic depth, fine-tune them, fold it back.

    import sdsurgery
    print(sdsurgery.find_residuals(model))
    sd_model = sdsurgery.convert(model, drop_rate=0.5)   # paper defaults: linear, block mode
    ...train...
    plain = sdsurgery.fold(sd_model)                     # the original architecture again
"""
import os as _os
import sys as _sys

# `torchrun ... -m sdsurgery`: this runs before torch is imported, while runpy still shows "-m".
# Every rank would print torch's C++ warnings (DDP's find_unused_parameters notice) once per
# process; the main rank prints them once. Library imports are not affected.
if _sys.argv[:1] == ["-m"] and _os.environ.get("RANK", "0") != "0" and "torch" not in _sys.modules:
    _os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from .version import __version__
from .io.checkpoint import CheckpointError, load, read_metadata, save
from .errors import FoldError, NoResidualsError, NotConvertedError, SurgeryError, TraceError
from .fold import fold, register_foldable
from .ops import register_drop_module, register_shortcut_op
from .io.models import (ModelSourceError, WeightsError, create_model, list_models,
                     register_model)
from .gate.gates import GateController, StochasticDepthGate, is_converted
from .find.residuals import Analysis, RejectedAdd, Residual, analyse, find_residuals
from .gate.surgery import controller, convert, gates, set_drop_rate


__all__ = [
    "CheckpointError", "ModelSourceError", "WeightsError", "create_model", "list_models",
    "load", "read_metadata", "register_model", "save",
    "Analysis", "FoldError", "GateController", "NoResidualsError", "NotConvertedError",
    "RejectedAdd", "Residual", "StochasticDepthGate", "SurgeryError", "TraceError", "analyse",
    "controller", "convert", "find_residuals", "fold", "gates", "is_converted", "set_drop_rate",
    "register_drop_module", "register_foldable", "register_shortcut_op",
]
