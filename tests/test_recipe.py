"""Recipe validation: one clear line per problem, naming the key and the fix; CLI flags override recipe values."""

from pathlib import Path

import pytest
import yaml

from yolocomp import recipe as rc
from yolocomp.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["demo", "yolov5s", "yolov8n", "yolo11n"])
def test_shipped_recipes_validate(name):
    recipe = rc.load(CONFIGS / f"{name}.yaml")
    assert recipe.model
    assert set(recipe.stages) <= set(rc.STAGES)
    if name != "demo":  # the full recipes chain prune -> distill -> qat -> export
        assert list(recipe.stages)[:4] == ["prune", "distill", "qat", "export"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"model": "yolov8n.yaml", "stages": {"prune": {"ratio": 1.5}}}, "stages.prune.ratio = 1.5 is outside (0, 1)"),
        ({"model": "yolov8n.yaml", "stages": {"prune": {"ratio": 0}}}, "stages.prune.ratio = 0 is outside (0, 1)"),
        ({"model": "yolov8n.yaml", "stages": {"qat": {"bits": 6}}}, "stages.qat.bits = 6 is not 4 or 8; use 8 or 4"),
        ({"model": "yolov8n.yaml", "stages": {"qat": {"epochs": "two"}}}, "stages.qat.epochs = 'two' should be int"),
        ({"model": "yolov8n.yaml", "stages": {"qat": {"epochs": True}}}, "stages.qat.epochs = True should be int"),
        ({"model": "yolov8n.yaml", "stages": {"prune": {"ration": 0.3}}}, "unknown key stages.prune.ration; did you mean ratio?"),
        ({"model": "yolov8n.yaml", "stages": {"prnue": {}}}, "unknown stage stages.prnue"),
        ({"model": "yolov8n.yaml", "imgsz": 100}, "imgsz = 100 must be a multiple of 32"),
        ({"model": "yolov8n.yaml", "colour": 1}, "unknown key colour"),
        ({"model": "missing/dir/w.pt"}, "model = missing/dir/w.pt not found"),
        ({"model": "yolov8n.yaml", "data": "missing/data.yaml"}, "data = missing/data.yaml not found"),
        ({"data": "synthetic"}, "missing key model"),
        ({"model": "yolov8n.yaml", "stages": {"ptq": {"calibrator": "kl"}}}, "'kl' is not one of auto, minmax, percentile, mse"),
        ({"model": "yolov8n.yaml", "stages": {"ptq": {"calibrator": "entropy"}}},
         "'entropy' was dropped: its KL clip cuts YOLO's activations"),
        ({"model": "yolov8n.yaml", "stages": {"qat": {"calibrator": "entropy"}}}, "use auto (the default), percentile, mse"),
    ],
)
def test_invalid_recipes_name_key_and_fix(tmp_path, raw, fragment):
    with pytest.raises(UserError) as err:
        rc.load(_write(tmp_path, raw))
    message = str(err.value)
    assert fragment in message
    assert str(tmp_path / "r.yaml") in message  # says which file
    assert all(";" in line or "missing" in line or "unknown stage" in line for line in message.splitlines())


def test_every_problem_reported_one_line_each(tmp_path):
    raw = {"model": "yolov8n.yaml", "stages": {"prune": {"ratio": 2.0, "min_channels": -1}, "qat": {"bits": 3}}}
    with pytest.raises(UserError) as err:
        rc.load(_write(tmp_path, raw))
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert any("ratio" in x for x in lines) and any("min_channels" in x for x in lines) and any("bits" in x for x in lines)


def test_cli_flags_override_recipe(tmp_path):
    data = tmp_path / "my.yaml"
    data.write_text("path: .\nval: .\nnames: {0: a}\n")
    recipe = rc.load(CONFIGS / "yolov5s.yaml", {"prune.ratio": 0.4, "data": str(data), "imgsz": None})
    assert recipe.stage("prune").ratio == 0.4
    assert recipe.data == str(data)
    assert recipe.imgsz == 640  # None = flag not given, recipe value kept
    assert recipe.stage("prune").sparsity_epochs == 30  # untouched recipe values survive


def test_flops_flag_replaces_ratio(tmp_path):
    recipe = rc.load(CONFIGS / "yolov8n.yaml", {"prune.flops_reduction": 0.35})
    assert recipe.stage("prune").flops_reduction == 0.35
    assert "ratio" not in recipe.stages["prune"]


def test_override_is_validated(tmp_path):
    with pytest.raises(UserError, match=r"stages.prune.ratio = 1.4 is outside"):
        rc.load(CONFIGS / "yolov8n.yaml", {"prune.ratio": 1.4})


def test_plain_model_yaml_gets_default_recipe(tmp_path):
    import ultralytics

    model_yaml = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    recipe = rc.load(model_yaml, {"prune.ratio": 0.2})
    assert recipe.model == str(model_yaml)
    assert recipe.stage("prune").ratio == 0.2
    assert recipe.stage("qat").bits == 8  # defaults fill stages the recipe does not list


def test_missing_and_broken_recipe_files(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        rc.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        rc.load(bad)


def test_unset_optimizer_is_left_to_the_stage(tmp_path):
    # QAT picks SGD with a small lr unless the recipe names an optimizer: a recipe default of Ultralytics' 'auto'
    # would silently override that (auto ignores lr0 and picks AdamW for short runs)
    path = tmp_path / "r.yaml"
    path.write_text("model: yolov8n.yaml\ndata: synthetic\nstages: {qat: {bits: 8, batch: 16}, train: "
                    "{epochs: 1, optimizer: AdamW}}\n")
    recipe = rc.load(path)
    assert "optimizer" not in recipe.stage("qat").trainer_overrides()
    assert recipe.stage("qat").trainer_overrides()["batch"] == 16
    assert recipe.stage("train").trainer_overrides()["optimizer"] == "AdamW"
