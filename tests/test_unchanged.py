"""The concepts a run need not train, told on CPU before any GPU step (`oneword.unchanged`)."""

import json

import mlflow
import pytest
import torch

from oneword import batch_records, registry
from oneword.batch import spec_of
from oneword.config import ConceptSpec, EvalConfig, GateThresholds, TrainConfig
from oneword.evaluation.protocol import evaluation_key, result_key
from oneword.unchanged import JUDGED_KEY, Settings, changed_concepts, result_keys

from .conftest import DREAMBENCH

TRAIN = TrainConfig(steps=2, checkpoint_every=2)
EVAL = EvalConfig(n_images=2, steps=2, checkpoint_budget=0)
GATE = GateThresholds()
CAT = {"images": str(DREAMBENCH / "cat"), "token": "<cat-u>", "init_word": "cat", "name": "cat-u"}
DOG = {"images": str(DREAMBENCH / "dog"), "token": "<dog-u>", "init_word": "dog", "name": "dog-u"}


@pytest.fixture(scope="module")
def trained_cat(tmp_path_factory, tiny_model_dir, cat_latents_dir):
    """<cat-u> trained as a pipeline's shard trains it (with a training key): its folder."""
    from oneword.train import train_group

    root = tmp_path_factory.mktemp("unchanged")
    spec = ConceptSpec(token=CAT["token"], init_word=CAT["init_word"])
    rows = train_group([("cat-u", spec, cat_latents_dir)], root / "out", TRAIN, base_model=str(tiny_model_dir),
                       checkpoint_root=root / "ckpt", progress=False)  # fmt: skip
    assert rows[0]["status"] == "trained"
    return root / "out" / "cat-u"


def _keys(model, concepts=(CAT,), train=TRAIN, evaluation=EVAL, gate=GATE, resolution=32, mode="crop"):
    return result_keys(list(concepts), Settings(str(model), train, evaluation, gate, resolution, mode)).keys


def test_the_key_told_before_training_is_the_one_train_and_evaluate_give(trained_cat, tiny_model_dir, tmp_path):
    trained = json.loads((trained_cat / "summary.json").read_text())["training_key"]
    assert _keys(tiny_model_dir) == {"cat-u": result_key(evaluation_key(trained, EVAL), GATE)}
    # what changes the result changes the key: settings, photos, preprocessing, evaluation, gate, the concept
    before = _keys(tiny_model_dir)["cat-u"]
    others = [
        _keys(tiny_model_dir, train=TrainConfig(steps=3, checkpoint_every=2)),
        _keys(tiny_model_dir, concepts=[{**CAT, "images": DOG["images"]}]),
        _keys(tiny_model_dir, resolution=16),
        _keys(tiny_model_dir, evaluation=EVAL.model_copy(update={"n_images": 3})),
        _keys(tiny_model_dir, gate=GateThresholds(min_editability=0.1)),
        _keys(tiny_model_dir, concepts=[{**CAT, "init_word": "dog"}]),
    ]
    assert [k["cat-u"] == before for k in others] == [False] * len(others)
    # and what does not, does not: how the run is drawn and watched
    same = TrainConfig(steps=2, checkpoint_every=2, log_every=3, sample_every=0, compile="default")
    assert _keys(tiny_model_dir, train=same)["cat-u"] == before


def test_what_train_refuses_of_a_concept_is_told_before_it_as_train_tells_it(tiny_model_dir, cat_latents_dir, tmp_path):
    from oneword.train import train_group

    wordy = {**CAT, "token": "cat", "name": "cat-word"}  # a word the model has: it would not learn a new one
    many = {**DOG, "n_vectors": 75}  # more vectors than a prompt holds beside its template's words
    elsewhere = {**CAT, "name": "cat-t", "templates": str(tmp_path / "templates.txt")}  # on the GPU pod, maybe
    # (a token of two words is refused with the manifest, by the spec: test_batch_manifest)
    told = result_keys([wordy, many, CAT, elsewhere], Settings(str(tiny_model_dir), TRAIN, EVAL, GATE, 32))
    assert list(told.keys) == ["cat-u"] and list(told.unknown) == ["cat-t"]  # not told: a run tries it
    assert [told.failing[n]["stage"] for n in ("cat-word", "dog-u")] == ["train", "train"]
    assert "vectors" in told.failing["dog-u"]["error"]
    rows = train_group([("cat-word", spec_of(wordy), cat_latents_dir)], tmp_path / "out", TRAIN,
                       base_model=str(tiny_model_dir), progress=False)  # fmt: skip
    assert (rows[0]["stage"], rows[0]["error"]) == ("train", told.failing["cat-word"]["error"])


def test_what_cannot_be_told_counts_as_changed(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    told = result_keys([{**DOG, "images": str(broken)}, CAT], Settings(str(tiny_model_dir), TRAIN, EVAL, GATE, 32))
    assert list(told.keys) == ["cat-u"]  # the concept whose photos do not read is told apart, with why
    assert told.unknown == {} and told.failing["dog-u"]["stage"] == "preprocess"
    assert "a.jpg" in told.failing["dog-u"]["error"]  # the error no attempt escapes: a batch records it at once
    told = result_keys([CAT], Settings(str(tmp_path / "no-such-model"), TRAIN, EVAL, GATE, 32))
    assert told.keys == {} and "did not load" in told.unknown["cat-u"] and not told.failing
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert _keys(single) == {}  # loads only whole: the GPU steps tell


def test_an_unchanged_concept_is_recorded_and_the_others_go_on(trained_cat, tiny_model_dir, tmp_path, mlflow_server):
    from oneword.batch import batch_report
    from oneword.evaluation.evaluate import evaluate

    evaluate(trained_cat, None, tmp_path / "eval", EVAL.model_copy(update={"clip_model": "toyworld-clip"}))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["evaluation_key"]  # what register tags the version with
    evaluation = EVAL.model_copy(update={"clip_model": "toyworld-clip"})
    registry.register(trained_cat, tmp_path / "eval", mlflow_server, name="cat-u", batch_id="night-1")

    given = Settings(str(tiny_model_dir), TRAIN, evaluation, GATE, 32)

    def tonight(concepts, batch_id, **changes):
        settings = Settings(str(tiny_model_dir), changes.get("train", TRAIN), evaluation, GATE, 32)
        return changed_concepts(list(concepts), settings, mlflow_server, batch_id)

    # the new concept trains, marked as told, so that a later lookup of the run asks no more; the registered one
    # does not
    assert tonight([DOG, CAT], "night-2") == [{**DOG, JUDGED_KEY: True}]
    assert tonight([{**CAT, JUDGED_KEY: True}], "night-8") == [{**CAT, JUDGED_KEY: True}]  # told: not asked again
    # a batch's plan records its unchanged concepts in its own run, all in one, not as a run each
    from oneword.batch_records import record_plan

    plan = record_plan(mlflow_server, "night-9", [CAT, DOG])
    settings = Settings(str(tiny_model_dir), TRAIN, evaluation, GATE, 32)
    assert changed_concepts([CAT, DOG], settings, mlflow_server, "night-9", plan_run_id=plan) == [
        {**DOG, JUDGED_KEY: True}
    ]
    assert [(c["name"], c["status"], c["version"]) for c in batch_report(mlflow_server, "night-9", [CAT, DOG])[
        "concepts"]] == [("cat-u", "unchanged", "1"), ("dog-u", "failed", None)]  # dog-u: trained by no step here
    client = mlflow.MlflowClient(mlflow_server)
    experiments = [e.experiment_id for e in client.search_experiments()]
    night_runs = client.search_runs(experiments, "tags.`oneword.batch_id` = 'night-9'")
    assert [r.info.run_id for r in night_runs] == [plan]
    # the plan tried again (a cluster's retry policy): in the same run, and what it found before is not kept
    assert record_plan(mlflow_server, "night-9", [DOG]) == plan
    assert batch_report(mlflow_server, "night-9", [DOG])["concepts"][0]["status"] == "failed"
    assert batch_records.batch_unchanged(mlflow_server, "night-9") == []
    assert record_plan(mlflow_server, "night-9", [CAT, DOG]) == plan
    assert changed_concepts([CAT, DOG], settings, mlflow_server, "night-9", plan_run_id=plan) == [
        {**DOG, JUDGED_KEY: True}
    ]
    assert [r.info.run_id for r in client.search_runs(experiments, "tags.`oneword.batch_id` = 'night-9'")] == [plan]
    assert [r["name"] for r in batch_records.batch_unchanged(mlflow_server, "night-9")] == ["cat-u"]
    report = batch_report(mlflow_server, "night-2", [CAT, DOG])
    assert {c["name"]: c["status"] for c in report["concepts"]}["cat-u"] == "unchanged"
    assert report["concepts"][0]["version"] == "1"
    assert [mv.version for mv in client.search_model_versions("name = 'cat-u'")] == ["1"]
    # another setting: trained (or taken from the kept trainings) and evaluated again
    assert tonight([CAT], "night-3", train=TrainConfig(steps=3, checkpoint_every=2)) == [{**CAT, JUDGED_KEY: True}]
    # photos that no attempt can read: a batch records the concept failed at preprocess, as that step would
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    bad = {**DOG, "images": str(broken)}
    # a single concept's run (on_error="fail"): its own steps fail the run, and say why
    assert changed_concepts([bad], given, mlflow_server, "night-5") == [bad]
    assert changed_concepts([bad], given, mlflow_server, "night-6", on_error="record") == []
    (row,) = batch_report(mlflow_server, "night-6", [bad])["concepts"]
    assert (row["status"], row["stage"]) == ("failed", "preprocess") and "a.jpg" in row["error"]
    # a token the model already has: train would refuse it at every attempt, so a batch records that at once
    taken = {**DOG, "token": "dog", "name": "dog-word"}
    assert changed_concepts([taken], given, mlflow_server, "night-7", on_error="record") == []
    (row,) = batch_report(mlflow_server, "night-7", [taken])["concepts"]
    assert (row["status"], row["stage"]) == ("failed", "train") and "already in the vocabulary" in row["error"]
    # a name the registry holds as a bundle: register would refuse it after the GPU work, so it is recorded now
    client.create_registered_model("dog-bundled", tags={"oneword.bundle": "true"})
    named = {**DOG, "name": "dog-bundled"}
    assert changed_concepts([named], given, mlflow_server, "night-8", on_error="record") == []
    (row,) = batch_report(mlflow_server, "night-8", [named])["concepts"]
    assert (row["status"], row["stage"]) == ("failed", "register") and "as a bundle of concepts" in row["error"]
    # a registry that does not answer: every concept goes on, nothing is lost, and the next lookup asks again
    assert changed_concepts([CAT], given, "http://127.0.0.1:9", "night-4") == [CAT]


def test_a_changed_gate_judges_the_recorded_scores_again_and_trains_only_what_would_take_the_champion(
    trained_cat, tiny_model_dir, tmp_path, mlflow_server
):
    from oneword.batch import batch_report
    from oneword.evaluation.evaluate import evaluate

    evaluation = EVAL.model_copy(update={"clip_model": "toyworld-clip"})
    evaluate(trained_cat, None, tmp_path / "eval", evaluation)
    strict = GateThresholds(min_reconstruction=1.0)  # no score of a random model reaches it
    first = registry.register(trained_cat, tmp_path / "eval", mlflow_server, name="cat-g", thresholds=strict)
    assert (first.version, first.alias) == ("1", "candidate")
    cat = {**CAT, "name": "cat-g"}

    def tonight(gate, batch_id):
        settings = Settings(str(tiny_model_dir), TRAIN, evaluation, gate, 32)
        return [{k: v for k, v in c.items() if k != JUDGED_KEY} for c in changed_concepts([cat], settings,
                                                                                          mlflow_server, batch_id)]

    # the bar lowered: judged again, version 1 would take @champion, so the run registers it (no GPU trains it:
    # its training was kept); the same gate again finds version 1
    assert tonight(strict, "gate-1") == []
    assert tonight(GATE, "gate-2") == [cat]
    second = registry.register(trained_cat, tmp_path / "eval", mlflow_server, name="cat-g", thresholds=GATE)
    assert (second.version, second.alias) == ("2", "champion")
    # the bar raised past the champion's scores: a twin would be a candidate, the champion keeps its alias, and
    # the report says so; a gate that it passes: the same, said so
    assert tonight(GateThresholds(min_editability=1.0), "gate-3") == []
    assert tonight(GateThresholds(margin_se=3.0), "gate-4") == []
    rows = [batch_report(mlflow_server, b, [cat])["concepts"][0] for b in ("gate-3", "gate-4")]
    assert [(r["status"], r["version"], r["alias"]) for r in rows] == [("unchanged", "2", "champion")] * 2
    assert "editability" in rows[0]["rejudged"] and "keeps @champion" in rows[0]["rejudged"]
    assert "passes the new thresholds" in rows[1]["rejudged"]
    client = mlflow.MlflowClient(mlflow_server)
    assert len(client.search_model_versions("name = 'cat-g'")) == 2  # no twin was registered
    # a version registered before it carried its evaluation key (keyed by the oneword release): evaluated again
    client.delete_model_version_tag("cat-g", "2", registry.EVALUATION_KEY_TAG)
    assert tonight(GateThresholds(margin_se=3.0), "gate-5") == [cat]


def test_the_model_is_read_without_its_weights_files_and_fingerprinted_as_train_does(tiny_model_dir, s3_bucket):
    """From an s3:// model only the tokenizers, text encoders and configs are fetched (a CPU pod, no UNet or VAE);
    fp16 encoders give the fingerprint that train's fp32 ones give."""
    from oneword.models import load_base_model
    from oneword.storage import upload_dir
    from oneword.unchanged import _encoders

    upload_dir(tiny_model_dir, f"s3://{s3_bucket}/sd")
    model = _encoders(f"s3://{s3_bucket}/sd")
    fetched = {p.relative_to(model.path).as_posix() for p in model.path.rglob("*") if p.is_file()}
    assert "unet/config.json" in fetched and "text_encoder/config.json" in fetched
    assert not [f for f in fetched if f.startswith(("unet/diffusion", "vae/diffusion"))], fetched
    assert model.text_encoder.dtype == torch.float16
    assert model.fingerprint == load_base_model(str(tiny_model_dir), parts=()).fingerprint
    keys = result_keys([CAT], Settings(f"s3://{s3_bucket}/sd", TRAIN, EVAL, GATE, 32)).keys
    assert list(keys) == ["cat-u"] and keys != _keys(tiny_model_dir)  # the source is part of the model's identity


def test_an_sdxl_model_is_fingerprinted_by_both_encoders_in_fp16_as_in_fp32(tmp_path):
    from oneword.models import load_base_model
    from oneword.random_models import build_tiny_sdxl_model
    from oneword.unchanged import _encoders

    xl = str(build_tiny_sdxl_model(tmp_path / "xl"))
    model = _encoders(xl)
    assert model.text_encoder_2 is not None and model.text_encoder_2.dtype == torch.float16
    assert model.fingerprint == load_base_model(xl, parts=()).fingerprint


def test_a_model_loaded_without_its_unet_has_the_fingerprint_of_the_model_loaded_with_it(tiny_model_dir, tmp_path):
    """SD 1.5's unet/config.json was saved by diffusers 0.6: the constructor's newer arguments are missing there
    and present in a loaded UNet's config. The lookup (no UNet) and train (a UNet) must fingerprint one model."""
    import shutil

    from oneword.models import load_base_model

    newer = ["addition_embed_type", "class_embed_type", "dropout", "num_attention_heads", "time_embedding_type",
             "mid_block_type"]  # fmt: skip
    copies = []
    for i in range(3):  # one folder per load: a folder's fingerprint is kept per process (`cached_fingerprint`)
        old = tmp_path / f"old-{i}"
        shutil.copytree(tiny_model_dir, old)
        saved = json.loads((old / "unet" / "config.json").read_text())
        assert set(newer) <= set(saved)
        (old / "unet" / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in newer}))
        copies.append(str(old))
    with_unet = load_base_model(copies[0], parts=("unet",)).fingerprint
    assert load_base_model(copies[1], parts=()).fingerprint == with_unet
    assert load_base_model(copies[2], parts=("vae",)).fingerprint == with_unet  # as cache_latents records it


def test_the_batch_plan_trains_at_most_the_run_limit_and_every_concept_has_its_turn(
    tiny_model_dir, tmp_path, mlflow_server
):
    """plan-batch (the component's own code, run here) records the concepts that would fail and leaves them out,
    takes at most max_concepts_per_run of the others, and records the rest in the plan as deferred, where the
    report finds them; the manifest's next runs take first those left most often in a row. A run limited to some
    of the manifest's concepts (only_concepts) plans those alone, and the manifest's nights neither read it nor
    are read by it."""
    import yaml
    from kfp.dsl import Metrics

    from oneword.batch import DEFERRED_KEY, final_report
    from oneword.batch_records import batch_plan
    from oneword.pipelines.components import plan_batch

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    entries = [{"images": str(DREAMBENCH / "cat"), "token": f"<p{i}-u>", "init_word": "cat"} for i in (1, 2, 3)]
    manifest = tmp_path / "concepts.yaml"
    broken_entry = {**entries[0], "images": str(broken), "token": "<pb-u>"}
    manifest.write_text(yaml.safe_dump({"concepts": [*entries, broken_entry]}))

    def night(batch_id: str, only: tuple[str, ...] = ()) -> tuple[list[str], dict]:
        metrics = Metrics(name="metrics", uri=str(tmp_path / batch_id), metadata={})
        shards = plan_batch.python_func(
            concepts_manifest=str(manifest), batch_id=batch_id, metrics=metrics, max_concepts_per_run=1,
            only_concepts=list(only),
            base_model=str(tiny_model_dir), resolution=32, steps=2, checkpoint_every=2, n_images=2, sampling_steps=2,
            checkpoint_budget=0, clip_model="toyworld-clip", tracking_uri=mlflow_server,
        )  # fmt: skip
        assert all(c[JUDGED_KEY] for s in shards for c in s)  # their shard's lookup asks nothing again
        return [c["name"] for s in shards for c in s], metrics.metadata

    taken, told = night("plan-1")
    assert taken == ["p1-u"] and told == {"told": 1, "to_train": 1, "deferred": 2}  # pb-u: its photos fail
    plan = {c["name"]: c.get(DEFERRED_KEY) for c in batch_plan(mlflow_server, "plan-1")}
    assert plan == {"p1-u": None, "p2-u": 1, "p3-u": 1, "pb-u": None}
    report = final_report(mlflow_server, "plan-1", lambda: batch_plan(mlflow_server, "plan-1"), "oneword", "SUCCEEDED")
    status = {c["name"]: (c["status"], c["stage"]) for c in report["concepts"]}
    assert status["p2-u"] == status["p3-u"] == ("deferred", None) and status["pb-u"] == ("failed", "preprocess")
    assert report["deferred"] == 2 and "max_concepts_per_run" in report["concepts"][1]["error"]
    # p1-u is not trained here, so it is to train again the next nights: it waits its turn behind the others
    assert night("plan-2")[0] == ["p2-u"]
    assert night("one-off", ("p1-u",)) == (["p1-u"], {"told": 0, "to_train": 1, "deferred": 0})
    assert [c["name"] for c in batch_plan(mlflow_server, "one-off")] == ["p1-u"]
    # more than it may train: the rest are left out, and told to start again, not to wait for a next night
    assert night("one-off-2", ("p3-u", "p2-u")) == (["p2-u"], {"told": 0, "to_train": 1, "deferred": 1})
    report = final_report(mlflow_server, "one-off-2", lambda: batch_plan(mlflow_server, "one-off-2"), "oneword",
                          "SUCCEEDED")  # fmt: skip
    (left,) = [c for c in report["concepts"] if c["status"] == "deferred"]
    assert left["name"] == "p3-u" and "start it in a run of its own" in left["error"]
    assert night("plan-3")[0] == ["p3-u"]  # left twice in a row: counted from plan-2, which the one-off did not end
    assert night("plan-4")[0] == ["p1-u"]


def test_the_lookup_keeps_no_photos_from_s3_once_it_has_keyed_them(tiny_model_dir, s3_bucket, tmp_path, monkeypatch):
    """A batch's plan looks at a whole catalogue's photos on one pod's disk: each concept's are downloaded beside
    its scratch dataset and deleted once keyed, not kept in oneword's cache."""
    from oneword.storage import upload_dir

    monkeypatch.setenv("ONEWORD_CACHE", str(tmp_path / "cache"))
    upload_dir(DREAMBENCH / "cat", f"s3://{s3_bucket}/cat")
    on_s3 = {**CAT, "images": f"s3://{s3_bucket}/cat"}
    assert _keys(tiny_model_dir, [on_s3]) == _keys(tiny_model_dir, [CAT])  # the same photos, the same key
    assert not list((tmp_path / "cache").rglob("*.jpg"))


def test_the_lookup_prepares_photos_ahead_in_threads_and_holds_few_concepts_on_disk(tiny_model_dir, monkeypatch):
    """A catalogue's plan downloads and preprocesses the next concepts' photos while it keys one: the same keys, in
    the manifest's order, with at most LOOKUP_AHEAD concepts' photos on disk at once."""
    import threading

    from oneword import unchanged

    concepts = [{**(CAT if i % 2 else DOG), "token": f"<t{i}-u>", "name": f"t{i}-u"} for i in range(7)]
    real, seen, lock = unchanged.preprocess, [], threading.Lock()

    def counted(images, out, **kw):  # the real step, counting the scratch folders beside its own
        with lock:
            seen.append((threading.current_thread().name, len(list(out.parent.parent.iterdir()))))
        return real(images, out, **kw)

    monkeypatch.setattr(unchanged, "preprocess", counted)
    monkeypatch.setattr(unchanged, "LOOKUP_AHEAD", 1)
    one_by_one = _keys(tiny_model_dir, concepts)
    monkeypatch.setattr(unchanged, "LOOKUP_AHEAD", 3)
    seen.clear()
    ahead = _keys(tiny_model_dir, concepts)
    assert list(ahead.items()) == list(one_by_one.items()) and len(set(ahead.values())) == len(concepts)
    assert all(name.startswith("oneword-lookup") for name, _ in seen) and len(seen) == len(concepts)
    assert max(n for _, n in seen) <= 3 - 1 and len({name for name, _ in seen}) > 1  # the others' folders
