import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from oneword.errors import OnewordError
from oneword.evaluation import prompts as P
from oneword.evaluation.compare import compare
from oneword.evaluation.evaluate import EvalConfig, evaluate
from oneword.evaluation.gate import EvaluatorMismatch, GateThresholds, quality_gate
from oneword.evaluation.metrics import (
    ClipScorer,
    DinoScorer,
    matched_cosine_rows,
    mean_matched_cosine,
    mean_pairwise_cosine,
    pairwise_cosine_rows,
    standard_error,
)
from oneword.evaluation.selection import CurvePoint, select_checkpoint
from oneword.inversion import ConceptSpec, TrainConfig
from oneword.random_models import build_tiny_clip, build_tiny_dino
from oneword.train import train


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    return build_tiny_dino(tmp_path_factory.mktemp("dino") / "dino")


def test_metrics_on_a_hand_computed_example():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unnormalised on purpose
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cosines: (1, 1/sqrt2, 0, 1/sqrt2) -> mean (1 + sqrt2) / 4
    assert mean_pairwise_cosine(a, b) == pytest.approx((1 + math.sqrt(2)) / 4)
    # self-pairs left out: only the two off-diagonal 0s
    assert mean_pairwise_cosine(a, a, exclude_diagonal=True) == pytest.approx(0.0)
    assert mean_matched_cosine(a, torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)
    # per image: row 0 scores (1 + 1/sqrt2) / 2, row 1 scores (0 + 1/sqrt2) / 2; their mean is the mean above
    rows = pairwise_cosine_rows(a, b)
    assert rows.tolist() == pytest.approx([(1 + 2**-0.5) / 2, 2**-0.5 / 2])
    assert float(rows.mean()) == pytest.approx(mean_pairwise_cosine(a, b))
    # two values 0.5 apart: sample std 0.5/sqrt2, standard error that over sqrt2 = 0.25
    assert standard_error(rows) == pytest.approx(0.25)
    assert matched_cosine_rows(a, torch.tensor([[1.0, 0.0], [1.0, 0.0]])).tolist() == pytest.approx([1.0, 0.0])
    assert math.isnan(standard_error(torch.tensor([0.3])))  # one image says nothing about the spread


def test_identical_images_reconstruct_perfectly(tiny_clip, tiny_dino):
    im = Image.effect_noise((40, 40), 60).convert("RGB")
    clip = ClipScorer(str(tiny_clip))
    e = clip.images([im] * 4)
    assert mean_pairwise_cosine(e, clip.images([im.copy()] * 3)) == pytest.approx(1.0, abs=1e-6)
    dino = DinoScorer(str(tiny_dino))
    assert mean_pairwise_cosine(dino.images([im] * 2), dino.images([im])) == pytest.approx(1.0, abs=1e-6)


def test_token_removal_matches_the_paper():
    assert P.without_token("A photo of {} on the moon") == "A photo of on the moon"
    assert P.without_token("An oil painting of {}") == "An oil painting of"
    assert P.with_token("Elmo holding a {}", "<cat>") == "Elmo holding a <cat>"


def test_prompt_sets(tmp_path):
    assert len(P.get_prompt_set("paper")) == 3
    assert len(P.get_prompt_set("neti15")) == 15
    obj, live = P.get_prompt_set("dreambench-object"), P.get_prompt_set("dreambench-live")
    assert len(obj) == 25 and len(live) == 25 and obj[0] == "a {} in the jungle"
    assert "a {} wearing a santa hat" in live
    f = tmp_path / "mine.txt"
    f.write_text("# comment\na {} in space\n\nthe {} at night\n")
    assert P.get_prompt_set(str(f)) == ("a {} in space", "the {} at night")
    f.write_text("no placeholder here\n")
    with pytest.raises(OnewordError, match="one '\\{\\}' per line"):
        P.get_prompt_set(str(f))
    # braces str.format would choke on after the models loaded are refused when the file is read
    for line in ("a photo of {} in {style}", "a {} with a { brace", "a {0} and {1}"):
        f.write_text(f"a {{}} in space\n{line}\n")
        with pytest.raises(OnewordError, match="no other braces") as bad:
            P.get_prompt_set(str(f))
        assert line in str(bad.value)
    f.write_text("  # an indented note\na {} in {{curly}} braces\n")
    assert P.get_prompt_set(str(f)) == ("a {} in {{curly}} braces",)
    assert P.with_token(P.get_prompt_set(str(f))[0], "<x>") == "a <x> in {curly} braces"
    from oneword.templates import get_templates

    t = tmp_path / "templates.txt"
    t.write_text("a photo of {} in {style}\n")
    with pytest.raises(OnewordError, match="template file"):
        get_templates(str(t))


def test_a_prompt_file_is_one_protocol_by_its_prompts_not_its_path():
    from oneword.evaluation.protocol import prompt_set_identity

    def scored(path, targets):
        return {"prompt_set": path, "per_prompt": [{"text_target": t} for t in targets]}

    same = prompt_set_identity(scored("/a/mine.txt", ["a in space"]))
    assert same == prompt_set_identity(scored("/b/copy.txt", ["a in space"])) and same.startswith("file sha256:")
    assert same != prompt_set_identity(scored("/a/mine.txt", ["a at night"]))  # the file was edited
    assert prompt_set_identity(scored("paper", ["a in space"])) == "paper"
    # where the token goes is part of a prompt: the same words around it are another protocol

    def asked(templates):
        return {"prompt_set": "/a/mine.txt", "per_prompt": [
            {"template": t, "text_target": t.replace("{} ", "").replace(" {}", "")} for t in templates]}  # fmt: skip

    moon, moved = asked(["{} on the moon", "an oil painting of {}"]), asked(["on the moon {}", "{} an oil painting of"])
    assert [p["text_target"] for p in moon["per_prompt"]] == [p["text_target"] for p in moved["per_prompt"]]
    assert prompt_set_identity(moon) != prompt_set_identity(moved)
    # a version scored before templates were recorded knew the file by its targets: it still compares with a new one
    from oneword.evaluation.protocol import differences, protocol

    def measured(m):
        return protocol({**m, "n_images": 4, "sampler": {}, "selection": {"budget": 0}, "model_fingerprint": "f",
                         "evaluator": {"name": "c", "fingerprint": "e"}}, 0, None)  # fmt: skip

    old = measured({**moon, "per_prompt": [{"text_target": p["text_target"]} for p in moon["per_prompt"]]})
    assert "prompt_targets" not in old and differences(measured(moon), old) == []
    assert differences(measured(moon), measured(moved)) != []  # two new ones: by their templates
    with pytest.raises(OnewordError, match="unknown prompt set"):
        P.get_prompt_set("nope")


def test_checkpoint_selection_on_a_synthetic_curve():
    curve = [
        CurvePoint(100, 0.60, 0.30),
        CurvePoint(200, 0.70, 0.28),
        CurvePoint(300, 0.75, 0.25),
        CurvePoint(400, 0.765, 0.22),  # best reconstruction
        CurvePoint(500, 0.74, 0.20),
    ]
    # within 0.02 of 0.765: steps 300 (0.75), 400, 500 -> most editable is 300
    assert select_checkpoint(curve, rule="balanced").step == 300
    assert select_checkpoint(curve, tolerance=0.0, rule="balanced").step == 400
    assert select_checkpoint(curve, tolerance=1.0, rule="balanced").step == 100
    assert select_checkpoint(curve).step == 300  # the default, latest-editable: 400 and 500 are less editable
    with pytest.raises(ValueError):
        select_checkpoint([])


def test_selection_counts_scores_within_their_noise_as_equal():
    # the colour-before-shape trap: step 50 has the colour (CLIP rates it as high as the rest) and the most
    # editability; later steps learn the shape, and editability falls only at 400
    se = dict(reconstruction_se=0.02, editability_se=0.02)
    curve = [
        CurvePoint(50, 0.60, 0.50, **se),
        CurvePoint(100, 0.62, 0.48, **se),
        CurvePoint(200, 0.63, 0.47, **se),
        CurvePoint(300, 0.62, 0.46, **se),
        CurvePoint(400, 0.64, 0.38, **se),  # best reconstruction, editability fallen
    ]
    # 2 SE of a difference is 0.057 here: every step's reconstruction counts as the best's, not only 0.02 away
    assert select_checkpoint(curve, tolerance=0.02, rule="balanced").step == 50  # the most editable, the earliest
    assert select_checkpoint(curve, tolerance=0.02, rule="latest-editable").step == 300  # later, until it falls
    # with no noise recorded, the fixed tolerance alone decides: within 0.01 of 0.64 are 200 and 400
    exact = [CurvePoint(p.step, p.reconstruction, p.editability) for p in curve]
    assert select_checkpoint(exact, tolerance=0.01, rule="balanced").step == 200
    assert select_checkpoint(exact, tolerance=0.01, rule="latest-editable").step == 200  # 400's editability fell
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_checkpoint(curve, rule="best")  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["balanced", "latest-editable"])
def test_a_checkpoint_that_scored_nan_is_never_selected_and_does_not_hide_the_others(rule):
    nan = float("nan")
    assert select_checkpoint([CurvePoint(100, nan, 0.2), CurvePoint(200, 0.8, 0.2)], rule=rule).step == 200
    assert select_checkpoint([CurvePoint(100, 0.8, nan), CurvePoint(200, 0.8, 0.25)], rule=rule).step == 200
    assert select_checkpoint([CurvePoint(100, 0.8, 0.3), CurvePoint(200, 0.9, nan)], rule=rule).step == 100
    with pytest.raises(OnewordError, match=r"steps 100, 200\) scored NaN"):
        select_checkpoint([CurvePoint(100, nan, 0.2), CurvePoint(200, 0.8, nan)], rule=rule)
    # one image a prompt leaves a score's spread unmeasured (nan): it counts as none, the other's still counts
    nan = [CurvePoint(50, 0.60, 0.50, math.nan, math.nan), CurvePoint(100, 0.64, 0.50, 0.02, 0.02)]
    assert select_checkpoint(nan, tolerance=0.01, rule="latest-editable").step == 100
    assert select_checkpoint(nan, tolerance=0.01, rule="balanced").step == 50  # 0.60 is within 2 x 0.02 of 0.64


def test_quality_gate():
    ev = {"name": "clip-a", "fingerprint": "sha256:aaa"}
    cand = {"reconstruction": 0.8, "editability": 0.3, "evaluator": ev}
    first = quality_gate(cand, None)
    assert first.passed and "no thresholds set" in first.reason  # no bar is read into a first champion
    assert "passes the thresholds" in quality_gate(cand, None, GateThresholds(min_reconstruction=0.5)).reason
    assert not quality_gate(cand, None, GateThresholds(min_reconstruction=0.9)).passed
    assert quality_gate(cand, {"reconstruction": 0.7, "editability": 0.3, "evaluator": ev}).passed
    worse = quality_gate(cand, {"reconstruction": 0.9, "editability": 0.3, "evaluator": ev})
    assert not worse.passed and "does not beat" in worse.reason


def test_quality_gate_refuses_scores_from_another_evaluator():
    cand = {"reconstruction": 0.9, "editability": 0.9, "evaluator": {"name": "a", "fingerprint": "sha256:aaa"}}
    champ = {"reconstruction": 0.1, "editability": 0.1, "evaluator": {"name": "b", "fingerprint": "sha256:bbb"}}
    with pytest.raises(EvaluatorMismatch, match="different evaluators"):
        quality_gate(cand, champ)


def _scored(rec, edit, se=0.0, **protocol):
    ev = {"name": "clip-a", "fingerprint": "sha256:aaa"}
    p = {"prompt_set": "paper", "n_images": 64, "seed": 0, "evaluator": ev, **protocol}
    return {"reconstruction": rec, "editability": edit, "reconstruction_se": se, "editability_se": se,
            "evaluator": ev, "protocol": p}  # fmt: skip


def test_quality_gate_compares_only_scores_measured_the_same_way():
    champion = _scored(0.5, 0.5)
    with pytest.raises(EvaluatorMismatch, match=r"prompt_set \(--prompt-set\): 'dreambench-object' vs 'paper'"):
        quality_gate(_scored(0.9, 0.9, prompt_set="dreambench-object"), champion)
    with pytest.raises(EvaluatorMismatch, match=r"n_images \(--n-images\): 16 vs 64"):
        quality_gate(_scored(0.9, 0.9, n_images=16), champion)
    old = {k: v for k, v in champion.items() if k != "protocol"}  # scored before protocols were recorded
    with pytest.raises(EvaluatorMismatch, match="before oneword recorded") as e:
        quality_gate(_scored(0.9, 0.9), old)
    assert "re-evaluate" in e.value.hint
    assert quality_gate(_scored(0.6, 0.5), champion).passed  # same protocol, no noise recorded: a plain lead
    # an evaluator is its weights and preprocessing, not the name it was loaded by (a hub id, its mirror)
    mirrored = _scored(0.6, 0.5, evaluator={"name": "s3://models/clip-a", "fingerprint": "sha256:aaa"})
    assert quality_gate(mirrored, champion).passed
    with pytest.raises(EvaluatorMismatch, match="evaluator"):
        quality_gate(_scored(0.6, 0.5, evaluator={"name": "clip-a", "fingerprint": "sha256:bbb"}), champion)
    # DINO is recorded, not gated on: a version scored with it compares with one scored without; two DINOs must agree
    dino = {"name": "facebook/dino-vits16", "fingerprint": "sha256:ddd"}
    assert quality_gate(_scored(0.6, 0.5, dino_evaluator=dino), champion).passed
    with pytest.raises(EvaluatorMismatch, match="dino_evaluator"):
        quality_gate(_scored(0.6, 0.5, dino_evaluator=dino),
                     _scored(0.5, 0.5, dino_evaluator={**dino, "fingerprint": "sha256:eee"}))  # fmt: skip


def test_a_score_that_is_not_finite_never_passes_the_gate():
    nan = math.nan
    for scores in ((nan, 0.5), (0.5, nan)):
        result = quality_gate(_scored(*scores), None)
        assert not result.passed and "not finite" in result.reason
        assert not quality_gate(_scored(*scores), _scored(0.1, 0.1)).passed
    # a champion whose scores were NaN holds its alias by no measure
    assert quality_gate(_scored(0.5, 0.5), _scored(nan, 0.5)).passed


def test_quality_gate_wants_a_lead_larger_than_the_noise():
    champion = _scored(0.5, 0.5, se=0.02)
    # sum's se per version: 0.02 * sqrt(2); the difference's: 0.04. A lead of 0.03 is noise, 0.05 is not.
    close = quality_gate(_scored(0.53, 0.5, se=0.02), champion)
    assert not close.passed and "by more than 0.0400" in close.reason
    assert quality_gate(_scored(0.55, 0.5, se=0.02), champion).passed
    assert quality_gate(_scored(0.53, 0.5, se=0.02), champion, GateThresholds(margin_se=0)).passed
    # one image a prompt: reconstruction's spread is unmeasured (nan) on both; a worse candidate must not pass
    one_image = {**_scored(0.5, 0.5, se=0.02), "reconstruction_se": math.nan}
    worse = {**_scored(0.2, 0.2, se=0.02), "reconstruction_se": math.nan}
    assert not quality_gate(worse, one_image).passed
    assert quality_gate({**_scored(0.6, 0.5, se=0.02), "reconstruction_se": math.nan}, one_image).passed


def test_each_seeds_score_is_recorded_for_the_gate(evaluated_concept):
    import json

    _, eval_dir = evaluated_concept
    m = json.loads((eval_dir / "metrics.json").read_text())
    per_seed = m["score_per_seed"]
    assert len(per_seed) == m["n_images"] and m["score_se"] > 0
    assert sum(per_seed) / len(per_seed) == pytest.approx(m["reconstruction"] + m["editability"], abs=1e-5)


def test_the_gate_pairs_two_versions_seed_by_seed():
    """Image j of every prompt of either version comes from seed j: where one seed draws a hard picture for both,
    the difference holds no noise of it. Paired, a steady lead passes that unpaired noise would have hidden."""
    import random

    rng = random.Random(0)
    seeds = [rng.gauss(0.0, 0.15) for _ in range(64)]  # how hard each seed's pictures are: shared
    champ_seeds = [1.0 + s + rng.gauss(0, 0.005) for s in seeds]
    cand_seeds = [1.02 + s + rng.gauss(0, 0.005) for s in seeds]

    def version(per_seed):
        mean = sum(per_seed) / len(per_seed)
        se = (sum((x - mean) ** 2 for x in per_seed) / (len(per_seed) - 1) / len(per_seed)) ** 0.5
        return {**_scored(mean / 2, mean / 2), "score_se": se, "score_per_seed": per_seed}

    champion, candidate = version(champ_seeds), version(cand_seeds)
    paired = quality_gate(candidate, champion)
    assert paired.passed and "paired difference's standard error" in paired.reason
    unpaired = quality_gate(*({k: v for k, v in m.items() if k != "score_per_seed"} for m in (candidate, champion)))
    assert not unpaired.passed  # the same lead, within the seeds' own spread
    broken = {**candidate, "score_per_seed": [float("nan"), *candidate["score_per_seed"][1:]]}
    assert quality_gate(broken, champion).passed == unpaired.passed  # a nan seed: the scores are not paired
    assert not quality_gate(champion, candidate).passed  # and paired, a worse version still loses


@pytest.fixture(scope="module")
def trained_concept(tmp_path_factory, cat_latents_dir):
    out = tmp_path_factory.mktemp("trained") / "train"
    train(
        cat_latents_dir,
        out,
        ConceptSpec(token="<cat-e>", init_word="cat"),
        TrainConfig(steps=6, checkpoint_every=2),
        progress=False,
    )
    return out


def test_evaluate_end_to_end(trained_concept, cat_dataset, tiny_clip, tiny_dino, tmp_path, monkeypatch):
    cfg = EvalConfig(
        n_images=2, steps=2, checkpoint_budget=1, clip_model=str(tiny_clip), dino_model=str(tiny_dino), grid_seeds=2
    )
    m = evaluate(trained_concept, cat_dataset, tmp_path / "eval", cfg)
    out = tmp_path / "eval"
    for name in ("metrics.json", "report.html", "grid.png", "scatter.png", "embedding/learned_embeds.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "metrics.json").read_text())["token"] == "<cat-e>"
    assert [p["step"] for p in m["selection"]["curve"]] == [2, 4, 6]
    assert m["step"] in (2, 4, 6)
    # with a DINO evaluator every checkpoint also gets subject fidelity, in "a photo of S*" and kept in the edits
    assert all(-1 <= p["fidelity"] <= 1 and -1 <= p["kept"] <= 1 for p in m["selection"]["curve"])
    # one picture a prompt and checkpoint: no second seed to measure a spread with (selection counts it as 0)
    assert all(math.isnan(p["kept_se"]) for p in m["selection"]["curve"])
    assert -1 <= m["reconstruction"] <= 1 and -1 <= m["editability"] <= 1 and -1 <= m["dino"] <= 1
    assert m["reconstruction_se"] >= 0 and m["editability_se"] >= 0  # 2 images, 6 edit images: measured
    assert len(m["per_prompt"]) == 3 and m["per_prompt"][0]["text_target"] == "A photo of on the moon"
    assert set(m["baselines"]) == {"image_only", "prompt_only", "points"}
    points = m["baselines"]["points"]  # the paper's reference points, both coordinates each
    assert points["image_only"]["reconstruction"] == m["baselines"]["image_only"]
    assert points["prompt_only"]["editability"] == m["baselines"]["prompt_only"]
    assert all(-1 <= v <= 1 for p in points.values() for v in p.values())
    assert "dreambench" not in m and "class_word" not in m  # the paper's protocol for the paper's prompts
    assert m["evaluator"]["fingerprint"].startswith("sha256:")
    # (1 + 3 prompts) x 2 images x 3 checkpoints at budget 1... plus the full run and the baseline
    assert m["images_generated"] == 4 * 1 * 3 + 4 * 2 + 3 * 2
    grid = Image.open(out / "grid.png").convert("RGB")
    assert grid.size == (200 + 2 * 32, (1 + 4) * 32)  # the photos' row (2 of 5: grid_seeds), then the prompts'
    from oneword.images import Manifest

    first = Manifest.load(cat_dataset).images[0].file
    photo = np.asarray(Image.open(cat_dataset / first).convert("RGB"))
    assert np.array_equal(np.asarray(grid.crop((200, 0, 232, 32))), photo)  # shown as it was trained on
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "&lt;cat-e&gt;" in html
    assert f"{m['reconstruction']:.4f} ± {m['reconstruction_se']:.4f}" in html

    p = m["protocol"]
    assert (p["prompt_set"], p["n_images"], p["seed"], p["selection_budget"]) == ("paper", 2, 0, 1)
    assert p["selection_seed"] != p["seed"] and p["base_model_fingerprint"] == m["model_fingerprint"]
    assert p["evaluator"]["preprocessing"] and p["dino_evaluator"]["name"] == str(tiny_dino)

    compare([str(out), str(out)], tmp_path / "cmp.png", labels=["a", "b"])
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert [r["run"] for r in json.loads((tmp_path / "cmp.json").read_text())] == ["a", "b"]
    assert compare([str(out)], tmp_path / "lr") == tmp_path / "lr.png" and (tmp_path / "lr.png").exists()
    # an evaluation against other images (`evaluate --data`) is marked as such beside one against the training's
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    (held_out / "metrics.json").write_text(json.dumps({**m, "reference_images": {"training_images": False, "n": 3}}))
    compare([str(out), str(held_out)], tmp_path / "mixed.png", labels=["a", "b"])
    assert [r["run"] for r in json.loads((tmp_path / "mixed.json").read_text())] == ["a", "b (other images)"]
    with pytest.raises(OnewordError, match="1 labels for 2 runs"):
        compare([str(out), str(out)], tmp_path / "x.png", labels=["only-one"])

    # an MLflow run id, read from the store every other command uses when no --tracking-uri is given
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    run = client.create_run(client.create_experiment("cmp", artifact_location=str(tmp_path / "artifacts")))
    client.log_artifact(run.info.run_id, str(out / "metrics.json"), "evaluation")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    compare([str(out), run.info.run_id], tmp_path / "ids.png")
    assert [r["run"] for r in json.loads((tmp_path / "ids.json").read_text())][1] == run.info.run_id[:8]


def test_selection_and_report_draw_disjoint_seeds(trained_concept, cat_dataset, tiny_clip, tmp_path):
    """With the selection budget equal to the reported images, shared seeds would make the chosen checkpoint's
    selection score the reported score exactly: the selection images must be others."""
    cfg = EvalConfig(n_images=2, steps=2, checkpoint_budget=2, clip_model=str(tiny_clip), baselines=False)
    seen = []
    m = evaluate(
        trained_concept,
        cat_dataset,
        tmp_path / "eval",
        cfg,
        on_checkpoint=lambda step, _, ims: seen.append((step, ims)),
    )
    (chosen,) = [p for p in m["selection"]["curve"] if p["step"] == m["step"]]
    assert chosen["reconstruction"] != pytest.approx(m["reconstruction"], abs=1e-6)
    assert chosen["reconstruction_se"] > 0 and chosen["editability_se"] > 0  # each point carries its noise
    # the hook sees every checkpoint's selection pictures: one row per prompt, the budget's images each
    assert [s for s, _ in seen] == [p["step"] for p in m["selection"]["curve"]]
    assert all(len(row) == 2 for _, ims in seen for row in ims)
    other = tmp_path / "other"
    compare_cfg = cfg.model_copy(update={"n_images": 1})
    evaluate(trained_concept, cat_dataset, other, compare_cfg)
    with pytest.raises(EvaluatorMismatch, match=r"n_images \(--n-images\): 2 vs 1"):
        compare([str(tmp_path / "eval"), str(other)], tmp_path / "cmp.png")


def test_dreambench_sets_follow_dreambooths_protocol(trained_concept, cat_dataset, tiny_clip, tiny_dino, tmp_path):
    """The class noun goes after the token and stays in the text target; DINO and CLIP-I cover every prompt's
    images; the report says which published table the numbers sit beside."""
    cfg = EvalConfig(
        prompt_set="dreambench-object", n_images=1, steps=2, checkpoint_budget=0, clip_model=str(tiny_clip),
        dino_model=str(tiny_dino), baselines=False,
    )  # fmt: skip
    m = evaluate(trained_concept, cat_dataset, tmp_path / "eval", cfg)
    assert m["class_word"] == "cat" and m["protocol"]["class_word"] == "cat"  # the initializer: the subject's class
    first = m["per_prompt"][0]
    assert (first["prompt"], first["text_target"]) == ("a <cat-e> cat in the jungle", "a cat in the jungle")
    assert len(m["per_prompt"]) == 25
    db = m["dreambench"]
    assert db["clip_t"] == m["editability"] and -1 <= db["clip_i"] <= 1 and -1 <= db["dino"] <= 1
    assert db["dino"] != m["dino"]  # over the 25 prompts' images, not only "A photo of S*"
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "DreamBench CLIP-I" in html and "DreamBooth (Ruiz et al. 2023) Table 1" in html


def test_checkpoints_in_a_relative_folder_are_found_by_evaluate(cat_latents_dir, tmp_path, monkeypatch):
    from oneword.evaluation.evaluate import _checkpoint_list

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    cfg = TrainConfig(steps=4, checkpoint_every=2)
    train(cat_latents_dir, out, ConceptSpec(token="<cat-rel>", init_word="cat"), cfg, checkpoint_dir="ckpts",
          progress=False)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint_dir"] == str(tmp_path / "ckpts")
    assert [s for s, _ in _checkpoint_list(out, summary)] == [2, 4]


def test_a_fresh_training_refuses_a_folder_that_holds_an_earlier_ones_checkpoints(cat_latents_dir, tmp_path):
    spec, out = ConceptSpec(token="<cat-again>", init_word="cat"), tmp_path / "out"
    train(cat_latents_dir, out, spec, TrainConfig(steps=4, checkpoint_every=2), progress=False)
    with pytest.raises(OnewordError, match=r"checkpoints of an earlier training \(steps 2-4\)") as e:
        train(cat_latents_dir, out, spec, TrainConfig(steps=3, checkpoint_every=3), progress=False)
    assert "--resume" in e.value.hint
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002.pt", "step-000004.pt"]
    r = train(cat_latents_dir, out, spec, TrainConfig(steps=6, checkpoint_every=2), progress=False, resume=True)
    assert r.steps == 6


def test_the_editability_error_is_over_seeds_with_the_prompts_held_fixed():
    from oneword.evaluation.metrics import standard_error, standard_error_over_seeds

    easy, hard = torch.tensor([0.30, 0.32, 0.31, 0.33]), torch.tensor([0.10, 0.12, 0.11, 0.13])
    # the prompts differ by 0.2, which another set of seeds would not change: it is not noise
    assert standard_error_over_seeds([easy, hard]) == pytest.approx(standard_error((easy + hard) / 2))
    assert standard_error_over_seeds([easy, hard]) < standard_error(torch.cat([easy, hard])) / 5
    assert math.isnan(standard_error_over_seeds([easy[:1], hard[:1]]))  # one seed: no spread to measure


def test_a_grid_of_large_samples_is_kept_within_what_viewers_open(tmp_path):
    from PIL import Image

    from oneword.evaluation.report import EMBED_WIDTH, img_tag
    from oneword.generate import make_grid

    big = [[Image.new("RGB", (1024, 1024), (i * 40, 0, 0)) for i in range(8)] for _ in range(3)]
    grid = make_grid(big, ["a", "b", "c"], label_width=200, max_cell=512)
    assert grid.size == (200 + 8 * 512, 3 * 512)  # SDXL's samples halved in the grid
    grid.save(tmp_path / "grid.png")
    tag = img_tag(tmp_path / "grid.png", "sample grid")
    assert "data:image/jpeg" in tag and "pixelated" not in tag  # shrunk to the page's double width, smooth
    import base64
    import io

    embedded = Image.open(io.BytesIO(base64.b64decode(tag.split("base64,")[1].split('"')[0])))
    assert embedded.width == EMBED_WIDTH
    small = make_grid([[Image.new("RGB", (32, 32))] * 4], max_cell=512)
    small.save(tmp_path / "small.png")
    assert "data:image/png" in (t := img_tag(tmp_path / "small.png", "toy")) and "pixelated" in t
    assert "max-width:100%" in t  # enlarged, yet never wider than a narrow window (the KFP dashboard's panel)


def test_checkpoints_before_every_vector_trained_are_never_candidates():
    from oneword.evaluation.evaluate import complete_checkpoints

    found = [(step, f"ckpt-{step}") for step in (50, 100, 150, 200, 250)]
    three = {"config": {"progressive_every": 100}, "concept": {"n_vectors": 3}}  # the third joins at step 200
    assert [s for s, _ in complete_checkpoints(found, three)] == [250]
    two = {"config": {"progressive_every": 100}, "concept": {"n_vectors": 2}}
    assert [s for s, _ in complete_checkpoints(found, two)] == [150, 200, 250]
    for off in ({"config": {"progressive_every": 0}, "concept": {"n_vectors": 3}}, {}):
        assert complete_checkpoints(found, off) == found
    # past the training's last step: a later training into its folder that was killed, the summary still its
    assert [s for s, _ in complete_checkpoints(found, {**two, "steps": 200})] == [150, 200]


def test_a_model_loaded_once_evaluates_again_after_a_failure_and_a_success(evaluated_concept, tiny_model_dir,
                                                                              tiny_clip_dir, tmp_path):  # fmt: skip
    """A notebook's model, handed to `evaluate` again: after one that failed (its evaluator missing) the next was
    refused for the token the first had loaded ("an embedding loaded into it before it was saved")."""
    from oneword.models import load_base_model

    train_dir, _ = evaluated_concept
    model = load_base_model(str(tiny_model_dir))
    vocabulary = len(model.tokenizer)
    config = EvalConfig(n_images=1, steps=2, checkpoint_budget=0, clip_model=str(tiny_clip_dir))
    with pytest.raises(OnewordError, match="CLIP"):
        evaluate(train_dir, None, tmp_path / "a", config.model_copy(update={"clip_model": str(tmp_path / "none")}),
                 base_model=model)  # fmt: skip
    assert len(model.tokenizer) == vocabulary
    first = evaluate(train_dir, None, tmp_path / "b", config, base_model=model)
    again = evaluate(train_dir, None, tmp_path / "c", config, base_model=model)
    assert first["reconstruction"] == again["reconstruction"] and len(model.tokenizer) == vocabulary


def test_a_checkpoint_of_other_photos_is_never_scored_as_the_trainings(evaluated_concept, tiny_clip_dir, tmp_path,
                                                                       caplog, monkeypatch):  # fmt: skip
    """A training copied without its checkpoints reads them from the folder its summary names, which may hold a
    later training's by now: their vectors were scored and registered as this training's. Each checkpoint is read
    once to tell (on S3, one download each)."""
    import json
    import logging
    import shutil

    from oneword import checkpoints
    from oneword.evaluation.evaluate import EvalConfig, evaluate

    train_dir, _ = evaluated_concept
    found = checkpoints.list_checkpoints(train_dir / "checkpoints")
    assert len(found) >= 2
    trained, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    shutil.copytree(train_dir, trained, ignore=shutil.ignore_patterns("checkpoints"))
    elsewhere.mkdir()
    for step, path in found:  # another training's, of other photos, where the summary says its checkpoints are
        state = checkpoints.load_checkpoint(path)
        state["image_sha256"] = {token: ["f" * 64] for token in state["vectors"]}
        checkpoints.save_checkpoint(elsewhere, step, state)
    summary = json.loads((trained / "summary.json").read_text())
    (trained / "summary.json").write_text(json.dumps({**summary, "checkpoint_dir": str(elsewhere)}))
    config = EvalConfig(n_images=1, steps=2, checkpoint_budget=1, clip_model=str(tiny_clip_dir))
    read, load = [], checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: read.append(path) or load(path))
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(trained, None, tmp_path / "eval", config)
    assert metrics["step"] == summary["steps"] and metrics["selection"]["curve"] == [], metrics["selection"]
    assert sorted(read) == sorted(path for _, path in checkpoints.list_checkpoints(elsewhere)), read
    said = " ".join(caplog.text.split())
    assert f"{len(found)} checkpoint(s) in the training's checkpoint folder learned <cat-r> from other photos" in said


def test_an_evaluation_with_other_photos_or_model_is_not_marked_as_the_pipelines(evaluated_concept, cat_dataset,
                                                                                  tiny_clip_dir, tmp_path):  # fmt: skip
    """A result marked with the evaluation key passes for the pipeline's own: a scheduled batch would keep it as
    "unchanged", and a concurrent register would take it for its twin."""
    import json
    import shutil

    from oneword.evaluation.evaluate import EvalConfig, evaluate

    train_dir, _ = evaluated_concept
    trained = tmp_path / "train"
    shutil.copytree(train_dir, trained)
    summary = json.loads((trained / "summary.json").read_text())
    (trained / "summary.json").write_text(json.dumps({**summary, "training_key": "t-1"}))
    config = EvalConfig(n_images=1, steps=2, checkpoint_budget=0, clip_model=str(tiny_clip_dir))
    assert "evaluation_key" in evaluate(trained, None, tmp_path / "own", config)
    assert "evaluation_key" not in evaluate(trained, cat_dataset, tmp_path / "other-photos", config)
    assert "evaluation_key" not in evaluate(trained, None, tmp_path / "other-model", config,
                                            base_model=summary["model_source"])  # fmt: skip


def test_an_output_that_cannot_be_written_is_refused_before_the_sampling(evaluated_concept, tiny_clip_dir, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """Found only when the evaluation moved in, after all its sampling (hours of a GPU, on SD)."""
    from oneword.evaluation import evaluate as ev

    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setattr(ev, "build_pipeline", lambda *a, **k: pytest.fail("sampled before the output was checked"))
    config = ev.EvalConfig(n_images=1, steps=2, checkpoint_budget=0, clip_model=str(tiny_clip_dir))
    with pytest.raises(OnewordError, match=f"cannot write the output {tmp_path / 'afile' / 'eval'}"):
        ev.evaluate(evaluated_concept[0], None, tmp_path / "afile" / "eval", config)


def test_a_training_image_edited_since_preprocess_is_refused_not_scored_against(evaluated_concept, tiny_clip_dir,
                                                                                 tmp_path):  # fmt: skip
    """Evaluation read the images its manifest names without checking them: one replaced since changed what
    "reconstruction" measures, with no word (0.69 fell to 0.29)."""
    import shutil

    from oneword.evaluation import evaluate as ev
    from oneword.images import Manifest

    trained = tmp_path / "train"
    shutil.copytree(evaluated_concept[0], trained)
    files = [trained / "dataset" / r.file for r in Manifest.load(trained / "dataset").images]
    shutil.copyfile(files[1], files[0])
    config = ev.EvalConfig(n_images=1, steps=2, checkpoint_budget=0, clip_model=str(tiny_clip_dir))
    with pytest.raises(OnewordError, match=f"{files[0]} is not the image its manifest names"):
        ev.evaluate(trained, None, tmp_path / "eval", config)


def test_scores_against_other_images_than_the_trainings_say_so(evaluated_concept, cat_dataset, tiny_clip_dir,
                                                               tmp_path, caplog):  # fmt: skip
    """`--data` may name held-out photos, but scores against them compare with no other evaluation: the log, the
    metrics and the report say so; the training's own images (a copy of them) pass without a word."""
    import json
    import logging
    import shutil

    from oneword.evaluation.evaluate import EvalConfig, evaluate
    from oneword.images import Manifest

    train_dir, _ = evaluated_concept
    fewer = tmp_path / "fewer"
    shutil.copytree(cat_dataset, fewer)
    manifest = json.loads((fewer / "manifest.json").read_text())
    manifest["images"] = manifest["images"][:-1]  # one photo held back
    (fewer / "manifest.json").write_text(json.dumps(manifest))
    n = len(Manifest.load(cat_dataset).images)
    config = EvalConfig(n_images=1, steps=2, checkpoint_budget=0, clip_model=str(tiny_clip_dir))
    with caplog.at_level(logging.WARNING, logger="oneword"):
        same = evaluate(train_dir, cat_dataset, tmp_path / "same", config)
    assert same["reference_images"]["training_images"] and not caplog.records
    page = (tmp_path / "same" / "report.html").read_text()
    assert "not the ones" not in page and "DINO subject fidelity (not measured: --dino-model)" in page  # how to
    with caplog.at_level(logging.WARNING, logger="oneword"):
        other = evaluate(train_dir, fewer, tmp_path / "other", config)
    assert other["reference_images"] == {"training_images": False, "n": n - 1, "folder": str(fewer)}
    said = " ".join(r.getMessage() for r in caplog.records)
    assert str(fewer) in said and f"{n - 1} of them among the {n}" in said
    assert "not the ones the concept was trained on" in (tmp_path / "other" / "report.html").read_text()


def test_one_training_image_has_no_image_only_point_rather_than_nan(evaluated_concept, cat_dataset, tiny_clip_dir,
                                                                     tmp_path):  # fmt: skip
    """The image-only reference compares each training image with the others: with one there is none, and the
    metrics (JSON, which has no NaN) and the registry's numbers leave the point out."""
    import json
    import math
    import shutil

    from oneword.evaluation.evaluate import EvalConfig, evaluate
    from oneword.registry import _eval_metrics

    train_dir, _ = evaluated_concept
    one = tmp_path / "one"
    shutil.copytree(cat_dataset, one)
    manifest = json.loads((one / "manifest.json").read_text())
    (one / "manifest.json").write_text(json.dumps({**manifest, "images": manifest["images"][:1]}))
    config = EvalConfig(n_images=2, steps=2, checkpoint_budget=0, clip_model=str(tiny_clip_dir))
    m = evaluate(train_dir, one, tmp_path / "eval", config)
    assert m["baselines"]["image_only"] is None and set(m["baselines"]["points"]) == {"prompt_only"}

    def no_nan(word):
        raise AssertionError(f"{word} in metrics.json")

    json.loads((tmp_path / "eval" / "metrics.json").read_text(), parse_constant=no_nan)
    numbers = _eval_metrics(m)
    assert "baseline_prompt_only" in numbers and not any(k.startswith("reference_image_only") for k in numbers)
    assert all(math.isfinite(v) for v in numbers.values())


def test_an_upgrade_that_changes_no_score_keeps_every_registered_result(monkeypatch):
    """The evaluation key (and so each version's result key) follows what the scores depend on, not the release:
    an upgrade of the image that changes none of it evaluates no concept again."""
    import oneword
    from oneword import profiles
    from oneword.evaluation import protocol

    config = EvalConfig()
    before = protocol.evaluation_key("t", config)
    monkeypatch.setattr(oneword, "__version__", "99.0.0")
    assert protocol.evaluation_key("t", config) == before
    changes = [
        lambda: monkeypatch.setattr(protocol, "SCORING_REVISION", protocol.SCORING_REVISION + 1),
        lambda: monkeypatch.setitem(profiles.PROFILES, "sdxl",
                                    profiles.PROFILES["sdxl"].model_copy(update={"sampling_steps": 7})),
        lambda: monkeypatch.setitem(P.BUILTIN, "paper", ("a photo of {}",)),
    ]  # fmt: skip
    for change in changes:  # what scores depend on: the scoring code's revision, a profile's default, a prompt set
        change()
        assert protocol.evaluation_key("t", config) != before
        monkeypatch.undo()
    assert protocol.evaluation_key("t", config) == before


def test_the_evaluation_says_how_many_images_it_drew_of_those_it_will(evaluated_concept, cat_dataset, tiny_clip_dir,
                                                                       tmp_path, monkeypatch, caplog):
    """Its progress lines count toward the images it draws in all: checkpoints, the chosen one's, the references."""
    import logging
    import re

    from oneword.evaluation import evaluate as E

    monkeypatch.setattr(E, "PROGRESS_EVERY_S", 0.0)  # every batch says so
    train_dir, _ = evaluated_concept
    with caplog.at_level(logging.INFO, logger="oneword.evaluation.evaluate"):
        metrics = E.evaluate(train_dir, cat_dataset, tmp_path / "eval", E.EvalConfig(
            n_images=2, steps=2, checkpoint_budget=1, batch_size=3, clip_model=str(tiny_clip_dir)))  # fmt: skip
    said = [tuple(map(int, m.groups())) for m in re.finditer(r"evaluate <cat-r>: drew (\d+) of (\d+) images",
                                                             caplog.text)]  # fmt: skip
    assert len(said) > 3 and [d for d, _ in said] == sorted(d for d, _ in said)
    assert said[-1] == (metrics["images_generated"], metrics["images_generated"]), said


def test_a_protocol_difference_names_the_evaluate_option_that_sets_it():
    """"selection_budget: 0 vs 2" named no option a person can find (`--checkpoint-budget`): each difference
    names its options, and each option named is one of `oneword evaluate`'s."""
    import typer

    from oneword.cli.app import app
    from oneword.evaluation.protocol import SET_BY, differences

    evaluate = typer.main.get_command(app).commands["evaluate"]
    options = {o for p in evaluate.params for o in p.opts}
    assert {o for said in SET_BY.values() for o in said.split(", ")} <= options
    said = differences({"selection_budget": 0, "seed": 1}, {"selection_budget": 2, "seed": 1})
    assert said == ["selection_budget (--checkpoint-budget): 0 vs 2"]
