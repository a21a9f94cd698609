"""The proof that the method works: on the shipped toy-world model, textual inversion learns a concept the model
has never drawn, from five pictures, and draws it in new contexts. Checked by the oracle, not by eye."""

import pytest
import torch

from oneword.models import load_base_model
from oneword.toyworld.assets import clip_path, model_path, oracle_path
from oneword.toyworld.oracle import Oracle


def test_the_shipped_model_is_small_and_loads_as_stable_diffusion():
    size = sum(f.stat().st_size for f in model_path().rglob("*") if f.is_file())
    assert size <= 30 * 2**20, size
    for part in ("unet", "text_encoder", "vae"):
        weights = next((model_path() / part).glob("*.safetensors"))
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # shipped in fp16
    m = load_base_model("toyworld")
    assert type(m.unet).__name__ == "UNet2DConditionModel" and type(m.text_encoder).__name__ == "CLIPTextModel"
    assert m.prediction_type == "v_prediction" and m.tokenizer.model_max_length == 20 and len(m.tokenizer) == 49408
    assert (model_path() / "README.md").read_text().count("oracle") >= 1
    assert (clip_path() / "config.json").exists() and oracle_path().exists()


def test_the_oracle_reads_renders():
    import random

    from oneword.toyworld import world
    from oneword.toyworld.oracle import SHAPE_CLASSES

    rng = random.Random(11)
    scenes = [world.sample_scene(rng, shape=rng.choice(SHAPE_CLASSES), training=False) for _ in range(400)]
    preds = Oracle.load().predict([world.render(s) for s in scenes])
    for attr in ("shape", "colour", "background", "size"):
        acc = sum(p[attr] == getattr(s, attr) for p, s in zip(preds, scenes)) / len(scenes)
        assert acc >= 0.95, (attr, acc)


def test_the_toy_clip_ranks_the_right_caption_first():
    from oneword.evaluation.metrics import ClipScorer
    from oneword.toyworld import world

    clip = ClipScorer("toyworld-clip")
    scene = world.Scene("star", "red", "plain", "large", "middle", "white", 16, 16, 12)
    img = clip.images([world.render(scene)])
    texts = clip.texts(
        [
            "a red star on a white background",
            "a blue circle on a black background",
            "a green square on a red background",
        ]
    )
    sims = (img @ texts.T)[0]
    assert int(sims.argmax()) == 0, sims


def test_the_toy_clip_tells_concepts_apart(tmp_path):
    """Reconstruction in CLIP space means something here: pictures of one concept are closer to each other than
    to pictures of another (the metric the evaluation step computes, with the toy CLIP)."""
    from PIL import Image

    from oneword.evaluation.metrics import ClipScorer, mean_pairwise_cosine
    from oneword.toyworld.concepts import write_concept

    clip = ClipScorer("toyworld-clip")
    star = clip.images([Image.open(p) for p in write_concept("purple-star", tmp_path / "a")])
    ring = clip.images([Image.open(p) for p in write_concept("orange-ring", tmp_path / "b")])
    same = mean_pairwise_cosine(star, star, exclude_diagonal=True)
    assert same > mean_pairwise_cosine(star, ring) + 0.05


@pytest.fixture(scope="module")
def purple_star_alone(tmp_path_factory):
    """Purple-star learned alone with the default toy-world settings: (result, its folder)."""
    from oneword.toyworld.quality import default_settings, run_concept

    work = tmp_path_factory.mktemp("purple-star-alone")
    return run_concept("purple-star", default_settings()[0], work, n_images=32), work / "purple-star--default"


@pytest.mark.slow
def test_textual_inversion_learns_a_held_out_concept(purple_star_alone):
    """Five pictures of a purple star (never rendered in training) -> the default toy-world settings ->
    at the checkpoint the evaluation picks, the oracle sees a purple star in "a photo of S*" and in edits."""
    r, _ = purple_star_alone
    assert r.reconstruction_oracle >= 0.85, r
    assert r.editability_oracle >= 0.8, r


def test_a_sweep_setting_is_scored_at_its_final_step(tmp_path):
    """Sweeps must show what a setting does, not what checkpoint selection rescues: select=False scores the last
    step, and writes no intermediate checkpoints."""
    from oneword.toyworld.quality import TOY_TRAIN, Setting, run_concept

    setting = Setting("final", TOY_TRAIN.model_copy(update={"steps": 20, "checkpoint_every": 10}), select=False)
    r = run_concept("purple-star", setting, tmp_path, n_images=2)
    assert r.chosen_step == 20 and r.curve == []
    assert [p.name for p in (tmp_path / "purple-star--final" / "train" / "checkpoints").glob("step-*")] == [
        "step-000020.pt"
    ]


@pytest.mark.slow
def test_every_drawable_concept_learns_in_a_group_as_purple_star_does_alone(purple_star_alone, tmp_path):
    """The CI proof on every drawable held-out concept: the four trained together (one batch, as a batch shard
    trains them; same settings and seed as purple-star alone) each meet both targets at the final step, as the
    oracle sees them, and purple-star's loss in the group equals its loss alone within noise."""
    import json
    import math
    import statistics

    from oneword.toyworld.concepts import CONCEPTS, get_concept
    from oneword.toyworld.quality import TOY_TRAIN, Setting, run_concepts

    _, alone_dir = purple_star_alone  # trained with TOY_TRAIN and seed 0, as the group below
    drawable = [c for c in CONCEPTS if get_concept(c).drawable]
    assert "purple-star" in drawable and len(drawable) == 4
    setting = Setting("final", TOY_TRAIN, select=False)  # the final step: what training reached, not a selection
    group = run_concepts(drawable, setting, tmp_path / "group", n_images=32)
    for r in group:
        assert r.targets_met, (r.concept, r.reconstruction_oracle, r.editability_oracle, r.per_edit_oracle)

    def late_loss(where) -> tuple[float, float]:
        """The mean logged loss over the second half of training, and its standard error."""
        curve = json.loads((where / "train" / "purple-star" / "curve.json").read_text())
        late = [p["loss"] for p in curve if p["step"] > TOY_TRAIN.steps // 2]
        return statistics.fmean(late), statistics.stdev(late) / math.sqrt(len(late))

    (a, se_a), (g, se_g) = late_loss(alone_dir), late_loss(tmp_path / "group" / f"{'+'.join(drawable)}--final")
    # a handful of logged single-step losses: equal within 3 standard errors of their difference (about 0.04)
    assert abs(a - g) <= 3 * math.hypot(se_a, se_g), (a, se_a, g, se_g)


def test_oracle_scatter_plots_drawable_concepts_by_setting(tmp_path):
    from PIL import Image, ImageChops

    from oneword.toyworld.quality import ConceptResult, oracle_scatter

    def plot(rows: list[tuple], name: str) -> Image.Image:
        results = [ConceptResult(c, s, 400, rec, edit, {}, 0.5, 0.4) for c, s, rec, edit in rows]
        return Image.open(oracle_scatter(results, tmp_path / name)).convert("RGB")

    rows = [
        ("purple-star", "final-default", 1.0, 0.83),
        ("orange-ring", "final-default", 1.0, 0.92),
        ("purple-star", "dti", 0.6, 0.5),
        ("orange-ring", "dti", 0.9, 0.7),
    ]
    full = plot(rows, "full.png")
    assert full.size == (880, 528)
    # each drawable point is drawn: taking one away (its concept and setting stay in the legend) changes the picture
    assert ImageChops.difference(full, plot(rows[:3], "fewer.png")).getbbox() is not None
    # the negative control (not drawable) is left out: adding it changes nothing
    with_control = plot([*rows, ("red-heart", "final-default", 0.0, 0.0)], "control.png")
    assert ImageChops.difference(full, with_control).getbbox() is None


def test_quality_over_seeds_reuses_recorded_runs_and_reports_the_spread(tmp_path, monkeypatch):
    """A multi-seed benchmark records each finished run at once; the next call reuses the runs recorded with the
    same concept, setting, seed, pictures and assets (a line cut short by a stop is redone), and the report gives
    each setting's targets met, mean and spread over concepts and seeds."""
    import json
    from dataclasses import asdict

    from oneword.toyworld import quality
    from oneword.toyworld.quality import (
        SELECTION_BUDGET,
        ConceptResult,
        _assets_fingerprint,
        _record,
        _recorded,
        _run_key,
        measure_quality,
        settings_named,
    )

    named = {s.name: s for s in settings_named(["default", "l2-decay"])}
    default, decay = "default", "l2-decay"
    scores = {  # (concept, setting, seed) -> oracle reconstruction, editability
        ("purple-star", default, 0): (1.0, 0.9),
        ("purple-star", default, 1): (1.0, 0.7),
        ("purple-star", decay, 0): (0.9, 0.85),
        ("purple-star", decay, 1): (1.0, 0.95),
        ("red-heart", default, 0): (0.0, 0.0),
        ("red-heart", default, 1): (0.0, 0.0),
    }
    assets = _assets_fingerprint()

    def key(c, s, seed):
        return _run_key(c, named[s], seed, 4, SELECTION_BUDGET, assets)

    def line(c, s, seed, rec, edit):
        result = ConceptResult(c, s, 400, rec, edit, {}, 0.6, 0.5, seed=seed)
        return json.dumps({"key": key(c, s, seed), "result": asdict(result)})

    ledger = tmp_path / "runs.jsonl"
    lines = [line(c, s, seed, *v) for (c, s, seed), v in scores.items()]
    ledger.write_text("\n".join(lines) + "\n" + line("purple-star", decay, 2, 1.0, 1.0)[:-40])  # stopped mid-write
    assert key("purple-star", decay, 2) not in _recorded(ledger)  # the cut run is not taken as done
    trained = []
    monkeypatch.setattr(quality, "run_concept", lambda *a, **k: trained.append(a) or pytest.fail("trained a run"))
    report = measure_quality(
        tmp_path,
        ["purple-star", "red-heart", "purple-star"],  # given twice: run once
        n_images=4,
        seeds=(0, 1, 0),
        settings=["default", "l2-decay"],
    )
    assert not trained
    got = [(r["concept"], r["setting"], r["seed"]) for r in report["results"]]
    assert sorted(got) == sorted(scores)  # each once, all reused
    by = report["summary"]["by_setting"]
    assert by["default"]["runs"] == 2 and by["default"]["targets_met"] == 1
    assert by["l2-decay"]["targets_met"] == 2
    assert abs(by["default"]["editability_oracle"] - 0.8) < 1e-9
    d = by["default"]
    assert abs(d["editability_oracle_sd"] - 0.1414) < 1e-3 and d["editability_oracle_min"] == 0.7
    assert report["summary"]["targets_met"] is False  # seed 1's default misses editability
    assert report["summary"]["seeds"] == [0, 1]
    md = (tmp_path / "quality.md").read_text()
    assert "| l2-decay | 2 | 2 / 2 | 0.95 ± 0.07 (0.90) | 0.90 ± 0.07 (0.85) |" in md
    assert "| red-heart | 1 | default |" in md  # the negative control is still reported
    # a run finished after the cut line is recorded on a line of its own, and read back
    again = ConceptResult("purple-star", "l2-decay", 400, 1.0, 1.0, {}, 0.6, 0.5, seed=2)
    _record(ledger, key("purple-star", decay, 2), again)
    assert _recorded(ledger)[key("purple-star", decay, 2)] == again
    assert len(_recorded(ledger)) == len(scores) + 1
    # without the default setting there is no verdict on it, rather than a false one
    assert quality._summary([again])["targets_met"] is None


def test_an_unknown_quality_setting_is_named_before_any_training():
    from oneword.errors import OnewordError
    from oneword.toyworld.quality import settings_named

    with pytest.raises(OnewordError, match="l2-fancy") as e:
        settings_named(["default", "l2-fancy"])
    assert "l2-decay" in e.value.hint
