"""Stage configs are the single source of each stage's options: recipe keys, CLI flags, API keywords, report settings."""

import dataclasses

import pytest

from yolocomp import recipe as rc
from yolocomp.cli import build_parser, main
from yolocomp.config import STAGE_CONFIGS, PruneConfig
from yolocomp.config.options import flag_name, settings
from yolocomp.errors import UserError

STAGE_COMMANDS = ("prune", "distill", "qat", "ptq", "export", "eval", "bench")


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


@pytest.mark.parametrize("stage", STAGE_COMMANDS)
def test_every_cli_option_is_a_flag_with_its_help(stage):
    sub = _subparser(stage)
    flags = {opt: a for a in sub._actions for opt in a.option_strings}
    for f in dataclasses.fields(STAGE_CONFIGS[stage]):
        if not f.metadata.get("cli", True):
            continue
        action = flags.get(flag_name(f.name))
        assert action is not None, f"{stage}: option {f.name} has no flag"
        assert f.metadata["help"] in action.help
        if f.metadata.get("choices") and not isinstance(f.default, bool):
            assert list(action.choices) == list(f.metadata["choices"])


@pytest.mark.parametrize("stage", [s for s in STAGE_CONFIGS if s != "train"])
def test_every_option_is_settable_from_a_recipe(tmp_path, stage):
    cls = STAGE_CONFIGS[stage]
    defaults = settings(cls())
    recipe = rc.validate({"model": "yolov8n.yaml", "stages": {stage: defaults}}, source="r.yaml")
    assert settings(recipe.stage(stage)) == defaults


def test_flag_reaches_the_stage_config(monkeypatch, tmp_path):
    seen = {}

    def fake_runner(recipe, model, out, data, reference, evaluate=True):
        from yolocomp.commands.common import StageResult

        seen["config"] = recipe.stage("prune")
        return StageResult("prune", model, {}, {})

    import yolocomp.commands as commands

    monkeypatch.setitem(commands.STAGE_RUNNERS, "prune", fake_runner)
    code = main(["prune", "--model", "yolov8n.yaml", "--attention", "se", "--max-layer-ratio", "0.5",
                 "--ignore", "9", "10", "--out", str(tmp_path / "out")])
    assert code == 0
    cfg = seen["config"]
    assert (cfg.attention, cfg.max_layer_ratio, cfg.ignore) == ("se", 0.5, [9, 10])
    assert cfg.ratio == PruneConfig().ratio  # untouched options keep their defaults


def test_api_keywords_are_validated_like_recipe_keys():
    with pytest.raises(UserError, match=r"stages.prune.ratio = 1.5 is outside \(0, 1\); use a share"):
        rc.stage_config("prune", {"ratio": 1.5})
    with pytest.raises(UserError, match="unknown key stages.qat.bitz; did you mean bits"):
        rc.stage_config("qat", {"bitz": 4})
    with pytest.raises(UserError, match="sets both ratio and flops_reduction"):
        rc.stage_config("prune", {"ratio": 0.2, "flops_reduction": 0.3})


def test_ultralytics_train_arguments_pass_through_training_stages():
    cfg = rc.stage_config("qat", {"warmup_epochs": 0, "mosaic": 0.0})
    assert cfg.trainer_overrides()["warmup_epochs"] == 0 and cfg.trainer_overrides()["mosaic"] == 0.0
    with pytest.raises(UserError, match="unknown key stages.ptq.warmup_epochs"):  # ptq does not train
        rc.stage_config("ptq", {"warmup_epochs": 0})


def test_choice_lists_are_defined_once():
    from yolocomp.config import CALIBRATORS, PRUNE_METHODS
    from yolocomp.quant import observers

    assert observers.CALIBRATORS is CALIBRATORS
    assert PruneConfig.__dataclass_fields__["method"].metadata["choices"] == PRUNE_METHODS
