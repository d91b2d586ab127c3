"""Recipes: a typed schema, errors that name the key, --set overrides with type checks."""
from pathlib import Path

import pytest

from sdsurgery.train.recipes import RecipeError, load_recipe, parse_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.train.epochs > 0 and recipe.model.name


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: {name: cifar_resnet56}\ntrain: {epochs: 3}\n")
    r = load_recipe(f, ["train.batch_size=32", "optimizer.lr=0.05", "stochastic_depth.mode=sample",
                        "data.mean=[0.5, 0.5, 0.5]", "train.clip_grad=1"])
    assert (r.model.name, r.train.epochs, r.train.batch_size, r.optimizer.lr) == ("cifar_resnet56", 3, 32, 0.05)
    assert r.stochastic_depth.mode == "sample" and r.data.mean == [0.5, 0.5, 0.5]
    assert r.train.clip_grad == 1.0 and isinstance(r.train.clip_grad, float)
    assert r.stochastic_depth.drop_rate == 0.5  # default


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "unknown recipe key 'trian' (did you mean 'train'?); valid keys: model, data"),
    ({"train": {"epoch": 3}}, "unknown recipe key 'train.epoch' (did you mean 'epochs'?); valid keys in train: epochs"),
    ({"train": {"epochs": "ten"}}, "train.epochs must be int, got str 'ten'"),
    ({"train": {"epochs": True}}, "train.epochs must be int, got bool"),
    ({"stochastic_depth": {"mode": "row"}}, "stochastic_depth.mode must be one of block, sample"),
    ({"data": {"dataset": "mnist"}}, "data.dataset must be one of cifar10, cifar100, svhn"),
    ({"optimizer": 3}, "optimizer must be a mapping"),
])
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert message in str(info.value)


def test_bad_overrides_and_files(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train: {epochs: 3}\n")
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(f, ["train.epochs"])
    with pytest.raises(RecipeError, match="train.epochs must be int"):
        load_recipe(f, ["train.epochs=1.5"])
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_name_resolvable_models(path):
    import sdsurgery
    spec = load_recipe(path).model.name
    name = spec.split(":", 1)[-1].split(".")[0]
    found = sdsurgery.list_models(name)
    assert found and any(f.split(":", 1)[0] == spec.split(":", 1)[0] or ":" not in spec for f in found), spec


def test_paper_recipes_carry_the_papers_settings():
    for path in RECIPES:
        if path.parent.name != "paper":
            continue
        r = load_recipe(path)
        assert r.paper.get("reported_test_error")
        # timm's sgd is SGD with Nesterov momentum, the paper's optimiser
        assert (r.optimizer.name, r.optimizer.lr, r.optimizer.momentum,
                r.optimizer.weight_decay, r.train.batch_size) == ("sgd", 0.1, 0.9, 1e-4, 128)
        assert (r.schedule.name, r.schedule.decay_rate, r.schedule.warmup_epochs) == ("multistep", 0.1, 0)
        assert (r.stochastic_depth.drop_rate, r.stochastic_depth.schedule) == (0.5, "linear")
        if r.data.dataset.startswith("cifar"):
            assert r.train.epochs == 500 and r.schedule.decay_milestones == [250, 375] and r.data.val_split == 5000
        else:
            assert r.train.epochs == 50 and r.schedule.decay_milestones == [30, 35]
            assert r.data.train_split == "train+extra"


def test_a_recipe_file_cannot_choose_code_to_run(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: 'subprocess:getoutput', kwargs: {cmd: 'touch pwned'}}\n")
    with pytest.raises(RecipeError, match="code the file chooses; .*--trust-code"):
        load_recipe(path)
    assert load_recipe(path, trust_code=True).model.name == "subprocess:getoutput"
    # the command line is the user's own: an override may name a factory
    assert load_recipe(path, ["model.name=models:CustomNet"]).model.name == "models:CustomNet"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(empty)
    empty.write_text("- model\n- data\n")
    with pytest.raises(RecipeError, match="must be a mapping of sections"):
        load_recipe(empty)


def test_every_float_spelling_is_a_float(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optimizer: {lr: 1e-3, weight_decay: .0005}\n")
    r = load_recipe(f, ["schedule.decay_rate=2E+1", "stochastic_depth.drop_rate=5e-1"])
    assert (r.optimizer.lr, r.optimizer.weight_decay, r.schedule.decay_rate, r.stochastic_depth.drop_rate) == (1e-3, 5e-4, 20.0, 0.5)
    with pytest.raises(RecipeError, match="optimizer.lr must be float, got str 'fast'"):
        load_recipe(f, ["optimizer.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", "train.epochs must be >= 1, got -1"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("optimizer.lr=0", "optimizer.lr must be > 0"),
    ("optimizer.lr=.nan", "optimizer.lr must be > 0, got nan"),
    ("optimizer.momentum=1.0", "optimizer.momentum must be >= 0 and < 1"),
    ("stochastic_depth.drop_rate=1", "stochastic_depth.drop_rate must be >= 0 and < 1"),
    ("data.image_size=-8", "data.image_size must be >= 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
    ("train.skip_nonfinite=-2", "train.skip_nonfinite must be >= 0"),
    ("schedule.decay_milestones=[2, -1]", "schedule.decay_milestones must hold non-negative numbers, got -1"),
    ("schedule.milestones=[2]", "recipe key 'schedule.milestones' is gone: it is schedule.decay_milestones now"),
    ("optimizer.nesterov=false", "sgd is Nesterov SGD, momentum is plain momentum SGD"),
    ("optimizer.name=adamww", "optimizer.name 'adamww' is not one of the .* choices; did you mean 'adamw'"),
    ("optimizer.betas=[0.9]", "optimizer.betas must be 2 numbers between 0 and 1, got [0.9]"),
    ("optimizer.layer_decay=0", "optimizer.layer_decay must be > 0 and <= 1"),
    ("schedule.name=exponential", "schedule.name must be one of cosine, multistep"),
    ("schedule.name=plateau", "schedule.name: plateau follows the validation top-1; set data.val_split"),
    ("data.auto_augment=rand-m9", "data.auto_augment is an option of timm's transforms; set data.transforms: timm"),
    ("data.re_prob=1.5", "data.re_prob must be >= 0 and <= 1"),
    ("mixup.mixup_alpha=-1", "mixup.mixup_alpha must be >= 0"),
    ("ema.decay=1", "ema.decay must be > 0 and < 1"),
    ("train.log_with=[tensorbord]", "train.log_with must list trackers among tensorboard, wandb"),

    ("data.std=[0.5, 0, 0.5]", "data.std must hold positive numbers, got 0"),
])
def test_nonsense_values_are_refused(tmp_path, override, message):
    f = tmp_path / "r.yaml"
    f.write_text("train: {epochs: 3}\n")
    with pytest.raises(RecipeError, match=message.replace("[", "\\[").replace("(", "\\(")):
        load_recipe(f, [override])
