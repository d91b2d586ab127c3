"""sdsurgery: give existing residual networks stochastic depth, fine-tune them, fold it back.

    import sdsurgery
    print(sdsurgery.find_residuals(model))
    sd_model = sdsurgery.convert(model, drop_rate=0.5)   # paper defaults: linear, block mode
    ...train...
    plain = sdsurgery.fold(sd_model)                     # the original architecture again
"""
from .checkpoint import CheckpointError, load, read_metadata, save
from .errors import FoldError, NoResidualsError, NotConvertedError, SurgeryError, TraceError
from .fold import fold
from .models import (ModelSourceError, WeightsError, create_model, list_models,
                     register_model)
from .gates import GateController, StochasticDepthGate, is_converted
from .residuals import Analysis, RejectedAdd, Residual, analyse, find_residuals
from .surgery import controller, convert, gates, set_drop_rate

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ModelSourceError", "WeightsError", "create_model", "list_models",
    "load", "read_metadata", "register_model", "save",
    "Analysis", "FoldError", "GateController", "NoResidualsError", "NotConvertedError",
    "RejectedAdd", "Residual", "StochasticDepthGate", "SurgeryError", "TraceError", "analyse",
    "controller", "convert", "find_residuals", "fold", "gates", "is_converted", "set_drop_rate",
]
