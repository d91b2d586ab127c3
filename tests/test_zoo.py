"""Coverage against timm's own drop-path slots and torchvision's documented blocks (tests/zoo.py).

The default run checks a fast set of families that must stay exact. `pytest --zoo` runs one
small variant of every timm family, every torchvision classification model and a tiny config of
several transformers families, and writes the tables to docs/coverage.md.
"""
import pytest

from zoo import check, check_torchvision, families

# Families whose smallest variant matches the oracle exactly, folds, and builds fast.
EXACT = {
    "byoanet": "halonet26t", "cait": "cait_xxs24_224", "convnext": "convnext_atto",
    "deit": "deit_tiny_patch16_224", "eva": "eva02_tiny_patch14_224",
    "efficientnet": "mobilenet_edgetpu_v2_xs", "inception_next": "inception_next_atto",
    "mobilenetv3": "mobilenetv3_small_050", "pvt_v2": "pvt_v2_b0", "regnet": "regnetv_040",
    "resnetv2": "resnetv2_18", "starnet": "starnet_s1", "vision_transformer": "vit_tiny_patch16_224",
    # each of these needed a rule of its own: residuals inside a timm leaf (nfnet), inside a
    # leaf's children (mobilevit), conv position encodings (davit), split-and-sum (res2net),
    # re-parameterisable branches (byobnet), a scaled shortcut (metaformer), max-pooled
    # shortcut (hiera), size-only position embeddings (xcit)
    "nfnet": "nf_regnet_b0", "mobilevit": "mobilevit_xxs", "davit": "davit_tiny",
    "res2net": "res2net50d", "byobnet": "repvgg_b0", "metaformer": "caformer_s18",
    "hiera": "hiera_tiny_224", "xcit": "xcit_nano_12_p8_224",
    # pooling token mixer (pool(x) - x), a residual in series inside a block's branch, a
    # transformer on a side path inside one
    "efficientformer": "efficientformer_l1", "edgenext": "edgenext_small", "csatv2": "csatv2",
    # x + bn(dwconv(x)) token mixers (iformer, shvit, efficientvit_msra); branches gated by
    # masking (coat, mvitv2, dpn, rexnet); unslotted residual blocks (gcvit,
    # efficientformer_v2, efficientvim); size-branching blocks traced on an example (tiny_vit)
    "iformer": "iformer_s", "shvit": "shvit_s1", "efficientvit_msra": "efficientvit_m0",
    "coat": "coat_tiny", "mvitv2": "mvitv2_tiny", "dpn": "dpn68", "rexnet": "rexnet_100",
    "gcvit": "gcvit_tiny", "efficientformer_v2": "efficientformerv2_s0", "efficientvim": "efficientvim_m1",
    "tiny_vit": "tiny_vit_5m_224",
    # sums of depthwise linear maps are one layer, not a block (the other side of the
    # x + bn(dwconv(x)) rule)
    "fastvit": "fastvit_s12", "repvit": "repvit_m1",
}


@pytest.mark.parametrize("family", sorted(EXACT))
def test_family_matches_timm_drop_path_slots(family):
    row = check(family, EXACT[family])
    assert row.status == "ok", row


# One model per torchvision family (the --zoo run checks all 80 classification models).
TORCHVISION = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
               "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
               "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
               "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11", "vit_b_32",
               "wide_resnet50_2"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_model_matches_its_architecture(name):
    row = check_torchvision(name)
    assert row.status == "ok", row


@pytest.mark.zoo
def test_zoo_table():
    import datetime
    import signal
    from pathlib import Path

    import timm
    import torch
    import torchvision
    import transformers
    from zoo import ZooRow, _hf_cases, check_transformers

    class _Timeout(Exception):
        pass

    def _alarm(*_):
        raise _Timeout()

    def run(family, name, fn):
        signal.alarm(300)
        try:
            return fn()
        except _Timeout:
            return ZooRow(family, name, -1, -1, -1, "timeout", "over 300 s on this machine", 300.0)
        except Exception as e:  # an error is a row of the table, not the end of the run
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            return ZooRow(family, name, -1, -1, -1, "error", f"{type(e).__name__}: {first}".replace("|", "/"), 0.0)
        finally:
            signal.alarm(0)

    signal.signal(signal.SIGALRM, _alarm)
    timm_rows = [run(f, n, lambda f=f, n=n: check(f, n)) for f, n in families().items()]
    tv_names = torchvision.models.list_models(module=torchvision.models)
    tv_rows = [run("torchvision", n, lambda n=n: check_torchvision(n)) for n in tv_names]
    hf_rows = [run("transformers", n, lambda n=n: check_transformers(n)) for n in _hf_cases()]

    def table(rows):
        out = ["| family | model | found / expected | foldable | masked | skip verified | status | reason |",
               "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r.family} | {r.model} | {r.found} / {r.expected} | {r.foldable} | {r.masked} | "
                f"{r.skip} | {r.status} | {r.reason} |" for r in rows]
        return out

    ok_timm = sum(r.status == "ok" for r in timm_rows)
    ok_tv = sum(r.status == "ok" for r in tv_rows)
    lines = ["# Coverage: residual branches found against the libraries' own oracles", "",
             f"{datetime.date.today()}, torch {torch.__version__}, timm {timm.__version__}, "
             f"torchvision {torchvision.__version__}; "
             "`make install && .venv/bin/python -m pytest --zoo -m zoo tests/test_zoo.py`", "",
             "How it is measured, what the columns and statuses mean: see the end of this page.", "",
             f"## torchvision: {ok_tv} of {len(tv_rows)} classification models exact", ""]
    lines += table(tv_rows)
    lines += ["", f"## timm: {ok_timm} of {len(timm_rows)} families exact (one small variant each)", ""]
    lines += table(timm_rows)
    ok_hf = sum(r.status == "ok" for r in hf_rows)
    lines += ["", f"## transformers {transformers.__version__}: {ok_hf} of {len(hf_rows)} families exact "
              "(tiny random configs, the model object with keyword inputs)", ""]
    lines += table(hf_rows)
    lines += ["", "## How this is measured", "", Path(__file__).with_name("zoo.py").read_text()
              .split('"""')[1].strip()]
    out = Path(__file__).parent.parent / "docs" / "coverage.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    # what the default run checks must hold in the zoo run too; no gate claims a skip it does not make
    assert not [r for r in timm_rows + tv_rows + hf_rows if r.status == "skip"]
    assert all(r.status == "ok" for r in timm_rows if r.family in EXACT), [r for r in timm_rows if r.family in EXACT]
    assert all(r.status == "ok" for r in tv_rows if r.model in TORCHVISION), [r for r in tv_rows if r.model in TORCHVISION]
