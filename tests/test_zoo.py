"""Coverage against timm's own drop-path slots (see tests/zoo.py).

The default run checks a fast set of families that must stay exact. `pytest --zoo` runs one
small variant of every timm family and writes the table to docs/coverage.md.
"""
import pytest

from zoo import check, families

# Families whose smallest variant matches the oracle exactly, folds, and builds fast.
EXACT = {
    "byoanet": "halonet26t", "cait": "cait_xxs24_224", "convnext": "convnext_atto",
    "deit": "deit_tiny_patch16_224", "eva": "eva02_tiny_patch14_224",
    "efficientnet": "mobilenet_edgetpu_v2_xs", "inception_next": "inception_next_atto",
    "mobilenetv3": "mobilenetv3_small_050", "pvt_v2": "pvt_v2_b0", "regnet": "regnetv_040",
    "resnetv2": "resnetv2_18", "starnet": "starnet_s1", "vision_transformer": "vit_tiny_patch16_224",
}


@pytest.mark.parametrize("family", sorted(EXACT))
def test_family_matches_timm_drop_path_slots(family):
    row = check(family, EXACT[family])
    assert row.status == "ok", row


@pytest.mark.zoo
def test_zoo_table(request):
    from pathlib import Path
    import datetime
    import timm
    import torch
    import torchvision
    import signal
    from zoo import ZooRow

    class _Timeout(Exception):
        pass

    def _alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for family, name in families().items():
        signal.alarm(180)
        try:
            rows.append(check(family, name))
        except _Timeout:
            rows.append(ZooRow(family, name, -1, -1, -1, "timeout", "over 180 s on this machine", 180.0))
        except Exception as e:  # an error is a row of the table, not the end of the run
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            rows.append(ZooRow(family, name, -1, -1, -1, "error", f"{type(e).__name__}: {first}".replace("|", "/"), 0.0))
        finally:
            signal.alarm(0)
    ok = sum(r.status == "ok" for r in rows)
    lines = ["# Coverage: timm families against their drop-path slots", "",
             f"{datetime.date.today()}, torch {torch.__version__}, timm {timm.__version__}, "
             f"torchvision {torchvision.__version__}; `make install && .venv/bin/python -m pytest --zoo -m zoo tests/test_zoo.py`", "",
             f"{ok} of {len(rows)} families exact.", "",
             "| family | model | found / expected | foldable | status | reason |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.family} | {r.model} | {r.found} / {r.expected} | {r.foldable} | {r.status} | {r.reason} |" for r in rows]
    out = Path(__file__).parent.parent / "docs" / "coverage.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    # the families the default run checks must be exact in the zoo run too
    assert all(r.status == "ok" for r in rows if r.family in EXACT), [r for r in rows if r.family in EXACT]
