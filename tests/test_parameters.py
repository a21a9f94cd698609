"""Every surface (CLI options, KFP component signatures, pipeline parameters, the batch manifest) takes its
defaults from one source: the config models (`oneword.config`), or the model's profile (`oneword.profiles`)."""

import json
import re
from pathlib import Path

import pytest
import typer

from oneword.cli import app
from oneword.cli.options import cli_help
from oneword.config import (
    MODEL_DEPENDENT_EVAL,
    MODEL_DEPENDENT_TRAIN,
    ConceptSpec,
    EvalConfig,
    GateThresholds,
    GenerateConfig,
    PreprocessConfig,
    TrackingConfig,
    TrainConfig,
)
from oneword.pipelines import components, definitions
from oneword.pipelines.parameters import (
    DEFAULTS,
    PIPELINE_HELP,
    RESOLUTION_FROM_PROFILE,
    SOURCES,
    source_default,
)
from oneword.profiles import PROFILES, TOYWORLD, profile

SRC = Path(__file__).parents[1] / "src" / "oneword"

# The library's commands and the config models whose fields their options are.
CLI_SOURCES = {
    "train": (TrainConfig, ConceptSpec, TrackingConfig),  # --learning-rate: TrainConfig's (a concept's: --concepts)
    "evaluate": (EvalConfig,),
    "generate": (GenerateConfig, TrackingConfig),
    "compare": (TrackingConfig,),
    "concepts list": (TrackingConfig,),
    "concepts show": (TrackingConfig,),
    "concepts pull": (TrackingConfig,),
    "concepts prune": (TrackingConfig,),
    "concepts promote": (TrackingConfig,),
    "concepts delete": (TrackingConfig,),
    "concepts bundle": (TrackingConfig,),
    "preprocess": (PreprocessConfig,),
    "register": (GateThresholds, TrackingConfig),
}
PIPELINE_COMMANDS = ("run", "batch")  # the pipelines on this machine: the pipelines' parameters


def _kfp_inputs(spec) -> dict:
    return {name: spec.inputs[name].default for name in spec.inputs}


def _cli_params(command: str) -> dict:
    """The options of `oneword COMMAND` (e.g. "train", or "concepts list")."""
    cmd = typer.main.get_command(app)
    for word in command.split():
        cmd = cmd.commands[word]
    return {p.name: p for p in cmd.params}


@pytest.mark.parametrize("pipeline", ["textual_inversion", "batch_personalisation", "personalise"])
def test_pipeline_parameters_take_their_defaults_from_the_config_models(pipeline):
    inputs = _kfp_inputs(getattr(definitions, pipeline).component_spec)
    checked = {name for name in inputs if name in SOURCES}
    assert len(checked) >= 15 if pipeline != "personalise" else len(checked) >= 14
    for name in checked:
        assert inputs[name] == DEFAULTS[name], f"{pipeline}.{name}: {inputs[name]!r} != {DEFAULTS[name]!r}"
    assert inputs["resolution"] == RESOLUTION_FROM_PROFILE


@pytest.mark.parametrize("component", components.ALL, ids=lambda c: c.name)
def test_component_signatures_agree_with_the_config_models(component):
    inputs = _kfp_inputs(component.component_spec)
    for name in inputs:
        if name in SOURCES and inputs[name] is not None:  # None: a required input, which has no default to drift
            assert inputs[name] == DEFAULTS[name], f"{component.name}.{name}: {inputs[name]!r} != {DEFAULTS[name]!r}"
    if "resolution" in inputs:
        assert inputs["resolution"] == RESOLUTION_FROM_PROFILE


# Options whose command uses the setting otherwise than the rest do: `train` falls back to no live run, not to
# ./mlflow.db, when neither the option nor $MLFLOW_TRACKING_URI is set.
OWN_HELP = {("train", "tracking_uri")}


@pytest.mark.parametrize("command", sorted(CLI_SOURCES))
def test_cli_options_take_defaults_and_help_from_the_config_models(command):
    params = _cli_params(command)
    checked: set[str] = set()
    for model in CLI_SOURCES[command]:
        for field, info in model.model_fields.items():
            if field not in params or info.is_required() or field in checked:
                continue
            checked.add(field)
            want = info.get_default(call_default_factory=True)
            got = params[field].default
            assert got == want, f"oneword {command} --{field}: default {got!r}, {model.__name__} says {want!r}"
            if (command, field) in OWN_HELP:
                assert params[field].help != cli_help(info.description), f"oneword {command} --{field}"
                continue
            assert params[field].help == cli_help(info.description), f"oneword {command} --{field}: help differs"
    assert len(checked) >= {"train": 15, "evaluate": 11, "generate": 6, "preprocess": 2, "register": 4}.get(command, 1)


@pytest.mark.parametrize("command", PIPELINE_COMMANDS)
def test_run_and_batch_options_are_the_pipelines_parameters(command):
    params = _cli_params(command)
    pipeline = definitions.textual_inversion if command == "run" else definitions.batch_personalisation
    inputs = _kfp_inputs(pipeline.component_spec)
    shared = [name for name in params if name in SOURCES]
    assert len(shared) >= 12
    for name in shared:
        assert params[name].default == DEFAULTS[name] == inputs[name], f"oneword {command} --{name}"
        library_help = SOURCES[name][0].model_fields[SOURCES[name][1]].description
        want = PIPELINE_HELP.get(name, library_help.split(" (")[0])  # the unset marker differs: 0 or empty, not None
        assert params[name].help.startswith(want), f"oneword {command} --{name}: help {params[name].help!r}"
    assert params["resolution"].default == inputs["resolution"] == RESOLUTION_FROM_PROFILE


def test_batch_offers_every_setting_run_offers_but_the_concepts_own():
    per_concept = {"images", "token", "init_word", "name", "n_vectors", "templates"}  # the manifest's fields
    run, batch = set(_cli_params("run")), set(_cli_params("batch"))
    batch_own = {"concepts_manifest", "concepts_per_shard", "only_concepts", "bundle", "dry_run", "as_json"}
    assert run - per_concept == batch - batch_own


def test_model_dependent_settings_are_unset_in_the_library_and_come_from_the_profile():
    for field in MODEL_DEPENDENT_TRAIN:
        assert source_default(field) is None
        assert TrainConfig().resolved(PROFILES[TOYWORLD]).model_dump()[field] == getattr(PROFILES[TOYWORLD], field)
    cfg = EvalConfig().resolved(PROFILES["sd1"])
    for field, key in MODEL_DEPENDENT_EVAL.items():
        assert getattr(cfg, field) == getattr(PROFILES["sd1"], key)
    # What the user sets wins over the profile.
    assert TrainConfig(steps=7).resolved(PROFILES[TOYWORLD]).steps == 7
    assert EvalConfig(clip_model="x").resolved(PROFILES[TOYWORLD]).clip_model == "x"


def test_batch_manifest_entries_share_the_concept_fields():
    from oneword.batch import ConceptEntry

    for field, info in ConceptSpec.model_fields.items():
        assert ConceptEntry.model_fields[field].default == info.default


def test_profiles_follow_the_model_config_not_its_name(tmp_path):
    from oneword.profiles import image_side

    # `oneword run --base-model toyworld` with nothing else: every unset setting is the toy world's tuned one.
    toy = profile(TOYWORLD)
    train, evaluation = TrainConfig().resolved(toy), EvalConfig().resolved(toy)
    assert (train.steps, train.learning_rate, train.checkpoint_every) == (400, 1e-3, 50)
    assert (evaluation.steps, evaluation.guidance_scale, evaluation.clip_model) == (25, 4.0, "toyworld-clip")
    assert (evaluation.prompt_set, toy.templates, image_side(TOYWORLD, 0), image_side(TOYWORLD, 48)) == (
        "toyworld",
        "toyworld",
        32,
        48,
    )
    for width, sample_size, family, side in [(768, 64, "sd1", 512), (1024, 96, "sd2", 768), (1024, 64, "sd2", 512)]:
        folder = tmp_path / f"m{width}-{sample_size}"
        for sub, cfg in {
            "text_encoder": {"hidden_size": width},
            "unet": {"sample_size": sample_size},
            "vae": {"block_out_channels": [128, 256, 512, 512]},
        }.items():
            (folder / sub).mkdir(parents=True)
            (folder / sub / "config.json").write_text(json.dumps(cfg))
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        p = profile(str(folder))
        assert (p.family, p.resolution) == (family, side)


def test_no_model_is_special_cased_by_name_outside_the_profile():
    """`"toyworld"` is spelled only where the toy world is defined: its profile and its asset loader."""
    allowed = {SRC / "toyworld" / "assets.py"}
    hits = [
        f"{path.relative_to(SRC)}:{i}"
        for path in SRC.rglob("*.py")
        if path not in allowed
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"""["']toyworld["']""", line)
    ]
    assert hits == []


def test_parameters_outside_the_config_models_agree_wherever_they_appear():
    """`on_error` and a concept's `name` are not config fields, yet appear in several signatures: one value each."""
    import inspect

    from oneword.batch import ConceptEntry
    from oneword.outcome import ON_ERROR_CHOICES
    from oneword.train import train_shard

    on_error, name = set(), set()
    for spec in [c.component_spec for c in components.ALL] + [definitions.textual_inversion.component_spec]:
        inputs = _kfp_inputs(spec)
        on_error |= {inputs["on_error"]} if "on_error" in inputs else set()
        name |= {inputs["name"]} if "name" in inputs else set()
    assert on_error == {ON_ERROR_CHOICES[0]} == {inspect.signature(train_shard).parameters["on_error"].default}
    assert name == {ConceptEntry.model_fields["name"].default} == {_cli_params("run")["name"].default}


def test_settings_are_checked_by_their_rules_before_a_run():
    from oneword.pipelines.parameters import invalid

    assert invalid(DEFAULTS) == [] and invalid({"resolution": RESOLUTION_FROM_PROFILE}) == []
    assert invalid({"resolution": 63})[0].startswith("resolution=63: Input should be a multiple of 8")
    assert invalid({"margin_se": float("inf"), "learning_rate": float("nan")}) == [  # as the configs refuse them
        "margin_se=inf: Input should be a finite number",
        "learning_rate=nan: Input should be a finite number, or 0.0: the model's profile",
    ]
    assert invalid({"resolution": -8, "steps": -3, "mode": "zoom"}) == [
        "resolution=-8: Input should be greater than or equal to 8, or 0: the model's native size",
        "steps=-3: Input should be greater than or equal to 1, or 0: the model's profile",  # as its help says
        "mode='zoom': Input should be 'crop' or 'pad'",
    ]


def test_configs_built_from_pipeline_parameters_are_the_library_defaults_and_take_a_change():
    from oneword.pipelines.parameters import config_of

    for model in (TrainConfig, EvalConfig, GateThresholds):
        assert config_of(model, DEFAULTS) == model()  # 0 and "" stand for the profile's: None
    assert config_of(EvalConfig, {**DEFAULTS, "sampling_steps": 7}).steps == 7
    assert config_of(TrainConfig, {**DEFAULTS, "steps": 9}, gpus=2).model_dump(include={"steps", "gpus"}) == {
        "steps": 9, "gpus": 2
    }  # fmt: skip


@pytest.mark.parametrize("lookup_step", [components.changed_concepts, components.plan_batch], ids=lambda c: c.name)
def test_the_cpu_lookup_of_unchanged_concepts_is_given_all_that_decides_a_result(lookup_step):
    """`changed_concepts` and `plan_batch` key what train, evaluate and register would: a setting they take that it
    did not (and took as its default) would make it call a concept changed, run after run."""
    from oneword.evaluation.protocol import RUNTIME_ONLY

    lookup = set(lookup_step.component_spec.inputs)
    # what the keys leave out (`train.group_key`, `protocol.evaluation_key`): how a run is drawn and watched
    runtime = {TrainConfig: {"sample_every", "compile"}, EvalConfig: RUNTIME_ONLY, GateThresholds: set(),
               PreprocessConfig: set()}  # fmt: skip
    for step in (components.train, components.evaluate, components.register, components.preprocess):
        keyed = {n for n in step.component_spec.inputs
                 if n in SOURCES and SOURCES[n][1] not in runtime.get(SOURCES[n][0], {SOURCES[n][1]})}  # fmt: skip
        assert keyed <= lookup, (step.name, keyed - lookup)
    assert {"base_model", "resolution", "mode"} <= lookup
