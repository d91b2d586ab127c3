"""create_model: where models come from, and the errors when they cannot come."""
import urllib.error

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

import sdsurgery
from sdsurgery.io.models import ModelSourceError, WeightsError, reset_classifier, source_of


@sdsurgery.register_model
def tiny_registered_net(num_classes: int = 10, width: int = 4):
    from models import CustomNet
    return CustomNet(num_classes)


def test_bare_names_resolve_sdsurgery_then_timm_then_torchvision():
    assert source_of(sdsurgery.create_model("tiny_registered_net", pretrained=False)).spec == "sdsurgery:tiny_registered_net"
    m = sdsurgery.create_model("resnet18", pretrained=False)
    assert isinstance(m, timm.models.ResNet) and source_of(m).spec == "timm:resnet18"
    tv = sdsurgery.create_model("vit_b_16", pretrained=False, image_size=32)  # torchvision only
    assert isinstance(tv, torchvision.models.VisionTransformer)
    assert source_of(tv).spec == "torchvision:vit_b_16" and source_of(tv).kwargs == {"image_size": 32}


def test_prefixes_force_a_source_and_num_classes_resets_the_head():
    tv = sdsurgery.create_model("torchvision:resnet18", pretrained=False, num_classes=7)
    assert isinstance(tv, torchvision.models.ResNet) and tv.fc.out_features == 7
    tm = sdsurgery.create_model("timm:resnet18.a1_in1k", pretrained=False, num_classes=5)
    assert isinstance(tm, timm.models.ResNet) and tm.fc.out_features == 5
    assert source_of(tm).num_classes == 5


def test_reset_classifier_of_torchvision_models():
    for name, head in (("mobilenet_v2", lambda m: m.classifier[-1]), ("vit_b_16", lambda m: m.heads.head)):
        m = torchvision.models.get_model(name, weights=None, **({"image_size": 32} if "vit" in name else {}))
        reset_classifier(m, 3)
        assert head(m).out_features == 3


def test_factories_from_modules_and_files(tmp_path):
    m = sdsurgery.create_model("models:CustomNet", num_classes=3)
    assert m.head.out_features == 3 and source_of(m).spec == "models:CustomNet"
    f = tmp_path / "mynet.py"
    f.write_text("import torch.nn as nn\n"
                 "def make(width=4):\n"
                 "    return nn.Sequential(nn.Linear(width, width))\n")
    net = sdsurgery.create_model(f"{f}:make", width=6)
    assert net[0].in_features == 6
    with pytest.raises(ModelSourceError, match="has no callable 'nope'"):
        sdsurgery.create_model(f"{f}:nope")
    with pytest.raises(ModelSourceError, match="does not take these arguments"):
        sdsurgery.create_model(f"{f}:make", depth=3)
    with pytest.raises(ModelSourceError, match="cannot import 'no_such_pkg.mod'"):
        sdsurgery.create_model("no_such_pkg.mod:make")


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ModelSourceError, match=r"unknown model 'resnet5' \(did you mean resnet50"):
        sdsurgery.create_model("resnet5", pretrained=False)
    with pytest.raises(ModelSourceError, match="Invalid pretrained tag"):
        sdsurgery.create_model("timm:resnet18.no_such_tag", pretrained=True)


def test_unfetchable_pretrained_weights_name_the_way_out(monkeypatch):
    def offline_timm(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to the Hub")
        raise AssertionError("should not build without weights")

    monkeypatch.setattr(timm, "create_model", offline_timm)
    with pytest.raises(WeightsError, match="--no-pretrained .* --weights FILE"):
        sdsurgery.create_model("timm:resnet18")

    def offline_tv(name, weights=None, **kw):
        if weights is not None:
            raise urllib.error.URLError("Name or service not known")
        raise AssertionError

    monkeypatch.setattr(torchvision.models, "get_model", offline_tv)
    with pytest.raises(WeightsError, match="cannot fetch pretrained weights for 'resnet18'.*--no-pretrained"):
        sdsurgery.create_model("torchvision:resnet18")


def test_weights_files_load_strictly(tmp_path):
    src = torchvision.models.resnet18(num_classes=4)
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, str(pt))
    for path in (st, pt):
        m = sdsurgery.create_model("torchvision:resnet18", num_classes=4, weights=path)
        assert torch.equal(m.fc.weight, src.fc.weight)
    with pytest.raises(WeightsError, match=r"does not fit ResNet: keys .*with other shapes \(fc.weight"):
        sdsurgery.create_model("torchvision:resnet18", num_classes=5, weights=st)
    with pytest.raises(WeightsError, match="missing"):
        sdsurgery.create_model("torchvision:resnet34", num_classes=4, weights=st)
    evil = tmp_path / "evil.pt"
    torch.save({"model": nn.Linear(2, 2)}, str(evil))  # a pickled module: refused by weights_only
    with pytest.raises(WeightsError, match="weights_only=True"):
        sdsurgery.create_model("torchvision:resnet18", weights=evil)
    with pytest.raises(WeightsError, match="does not exist"):
        sdsurgery.create_model("torchvision:resnet18", weights=tmp_path / "none.safetensors")


def test_list_models_filters_by_glob():
    names = sdsurgery.list_models("resnet1*")
    assert "timm:resnet18" in names and "torchvision:resnet152" in names
    assert "sdsurgery:tiny_registered_net" in sdsurgery.list_models("tiny_registered*")
    assert sdsurgery.list_models("no_model_has_this_name*") == []


def test_hf_hub_specs_go_through_timm(monkeypatch):
    seen = {}

    def fake(name, pretrained=False, **kw):
        seen["name"], seen["pretrained"] = name, pretrained
        return nn.Linear(2, 2)

    monkeypatch.setattr(timm, "create_model", fake)
    m = sdsurgery.create_model("hf-hub:timm/resnet18.a1_in1k")
    assert seen == {"name": "hf-hub:timm/resnet18.a1_in1k", "pretrained": True}
    assert source_of(m).spec == "hf-hub:timm/resnet18.a1_in1k"
