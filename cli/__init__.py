"""Command-line front end of sdsurgery (typer), installed as `sdsurgery_cli` (the repository
keeps it in cli/). The library never imports this package."""
import signal
import sys

__all__ = ["run", "interrupted", "reported"]

_interrupted = False
_reported = False  # the interruption's one line is printed


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _defer_sigint(signum, frame):
    # While torch and its extensions import: a KeyboardInterrupt raised inside a C++ callback
    # aborts the process ("terminate called ... pybind11::error_already_set"); note it instead.
    global _interrupted
    _interrupted = True


def reported() -> None:
    """Say that the one line about an interruption has been printed."""
    global _reported
    _reported = True


def interrupted() -> bool:
    """Whether Ctrl-C was pressed. An import cut short by it can fail later with another error
    (numpy half-imported: RecursionError); such errors are reported as the interruption."""
    return _interrupted


def run() -> None:
    """The ``sdsurgery`` entry point. Ctrl-C at any moment, even while torch is still being
    imported, ends with exit code 130 and one line (never a traceback)."""
    import os
    if os.environ.get("RANK", "0") != "0" and "torch" not in sys.modules:
        # torch's C++ warnings (DDP's find_unused_parameters notice) once, from the main rank
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:
        signal.signal(signal.SIGINT, _defer_sigint)
    except ValueError:  # not the main thread
        pass
    try:
        from sdsurgery_cli.main import main
        if _interrupted:
            raise KeyboardInterrupt
        if signal.getsignal(signal.SIGINT) is _defer_sigint:
            signal.signal(signal.SIGINT, _on_sigint)
        main()
    except SystemExit as e:
        # Ctrl-C outside a command's body (typer parsing its arguments, right after the imports)
        # is turned into exit 130 by typer, silently: say it here.
        if e.code == 130 and not _reported:
            sys.stderr.write("interrupted; nothing was written\n")
        raise
    except BaseException as e:
        if not (_interrupted or isinstance(e, KeyboardInterrupt)):
            raise
        sys.stderr.write("interrupted; nothing was written\n")
        sys.exit(130)
