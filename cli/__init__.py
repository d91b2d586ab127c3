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


def _unraisable(unraisable) -> None:
    # Python swallows an exception raised where it cannot propagate (a weakref callback such as
    # importlib's module-lock cleanup, a __del__) and prints "Exception ignored in ...". A
    # KeyboardInterrupt from our handler lost that way would leave the command running: deliver
    # the interrupt again from a thread a moment later (in this thread, interrupt_main would run
    # the handler at once, inside this hook) and print nothing about the lost one.
    global _again
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and _interrupted:
        import _thread
        import threading
        _again = threading.Timer(0.05, _thread.interrupt_main, (signal.SIGINT,))  # portable, unlike os.kill
        _again.daemon = True
        _again.start()
        return
    _chained_unraisable(unraisable)


_again = None  # the pending re-delivery: cancelled when the command has ended
_chained_unraisable = sys.unraisablehook


def _install_on_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt (also where Python would swallow it, see _unraisable)."""
    global _chained_unraisable
    if sys.unraisablehook is not _unraisable:
        _chained_unraisable = sys.unraisablehook
        sys.unraisablehook = _unraisable
    signal.signal(signal.SIGINT, _on_sigint)


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
            _install_on_sigint()
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
    finally:
        if _again is not None:  # not into the exit handlers (trackers flushing, ...)
            _again.cancel()
