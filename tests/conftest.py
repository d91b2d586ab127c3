import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import CASES, randomize  # noqa: E402

_BUILT: dict[str, torch.nn.Module] = {}


def built(case) -> torch.nn.Module:
    """A randomised eval-mode instance of ``case`` (built once per session, copied per test)."""
    if case.id not in _BUILT:
        torch.manual_seed(0)
        _BUILT[case.id] = randomize(case.build()).eval()
    return copy.deepcopy(_BUILT[case.id])


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request):
    return request.param


def pytest_addoption(parser):
    parser.addoption("--zoo", action="store_true", help="run the whole-zoo coverage run (slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "zoo: the whole-zoo coverage run (needs --zoo)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--zoo"):
        return
    skip = pytest.mark.skip(reason="the whole-zoo run needs --zoo")
    for item in items:
        if "zoo" in item.keywords:
            item.add_marker(skip)


def replay_keeps(model, steps: int) -> dict:
    """How often each gate of ``model`` keeps its branch over ``steps`` train forwards (block
    mode, one draw per gate per forward in call order), replayed from the gates' own generator
    as it is now. Call before running the forwards, then compare with counted module calls."""
    import collections

    import sdsurgery
    ctrl = sdsurgery.controller(model)
    state = ctrl.generator.get_state()
    kept = collections.Counter()
    for _ in range(steps):
        for g in sorted(sdsurgery.gates(model), key=lambda g: g.index):
            if not torch.rand((), generator=ctrl.generator).item() < g.drop_prob:
                kept[g.name] += 1
    ctrl.generator.set_state(state)
    return kept
