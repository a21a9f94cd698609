"""Bundles (`oneword concepts bundle`): many concepts' embeddings registered as one servable model, on a real
SQLite MLflow store, loaded and predicted as `mlflow models serve` does."""

import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from oneword import bundles, catalogue, registry, tracking
from oneword import embeddings as E
from oneword.cli import main
from oneword.errors import OnewordError


def _another_concept(train_dir: Path, eval_dir: Path, out: Path, token: str, shift: float) -> tuple[Path, Path]:
    """A copy of a trained and evaluated concept under another token, with other vectors (tilted by `shift`: a
    shift alike in every dimension, the text encoder's layer norm would take away)."""
    train, evaluation = out / "train", out / "eval"
    shutil.copytree(train_dir, train)
    shutil.copytree(eval_dir, evaluation)
    summary = json.loads((train / "summary.json").read_text())
    summary["concept"]["token"] = token
    (train / "summary.json").write_text(json.dumps(summary))
    metrics = json.loads((evaluation / "metrics.json").read_text())
    key = f"{metrics.get('evaluation_key')} as {token} + {shift}"  # another result: registered as a version of its own
    (evaluation / "metrics.json").write_text(json.dumps({**metrics, "token": token, "evaluation_key": key}))
    emb = E.load(train / "learned_embeds.safetensors")
    emb = E.Embedding(token, emb.vectors + shift * torch.linspace(-1, 1, emb.width), emb.meta)
    for f in (train / "learned_embeds.safetensors", evaluation / "embedding" / "learned_embeds.safetensors"):
        E.save(emb, f)
    for fmt in ("a1111", "kohya"):
        shutil.rmtree(evaluation / "embedding" / fmt)
        E.save(emb, evaluation / "embedding" / fmt / E.default_filename(token, fmt), fmt)
    return train, evaluation


@pytest.fixture
def store(evaluated_concept, tmp_path):
    """A SQLite store holding concepts bundle-cat (<cat-r>) and bundle-dog (<dog-b>), both at @champion."""
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_dir, eval_dir = evaluated_concept
    registry.register(train_dir, eval_dir, uri, name="bundle-cat")
    registry.register(*_another_concept(train_dir, eval_dir, tmp_path / "dog", "<dog-b>", 0.5), uri, name="bundle-dog")
    return uri


def test_a_bundle_serves_every_members_token_as_each_concept_alone_does(store, tmp_path, capsys):
    """One model, one base-model load: a prompt with a member's token draws what that concept's own model draws,
    seed for seed; a prompt may name two."""
    main(["concepts", "bundle", "studio", "bundle-*", "--tracking-uri", store])
    said = capsys.readouterr().out
    assert "registered studio/1: 2 concepts on" in said and "<dog-b>" in said and "<cat-r>" in said
    assert f"MLFLOW_TRACKING_URI={store} mlflow models serve -m models:/studio/1" in " ".join(said.split())
    mlflow.set_tracking_uri(store)
    bundle = mlflow.pyfunc.load_model("models:/studio/latest")
    prompts = ["a photo of <cat-r>", "a photo of <dog-b>", "<cat-r> beside <dog-b>"]
    drawn = bundle.predict(prompts, params={"n": 1, "steps": 2, "seed": 5})["png_base64"].tolist()
    for name, prompt, picture in (("bundle-cat", prompts[0], drawn[0]), ("bundle-dog", prompts[1], drawn[1])):
        alone = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        assert alone.predict([prompt], params={"n": 1, "steps": 2, "seed": 5})["png_base64"][0] == picture, name
    assert drawn[0] != drawn[1] and len(drawn) == 3  # the prompts differ in the token alone: each has its vectors
    shown = catalogue.show_concept("studio/1", store)
    assert shown["tags"][bundles.MEMBERS_TAG] == "bundle-cat/1,bundle-dog/1"
    main(["concepts", "show", "bundle-dog", "--tracking-uri", store])
    assert "bundled in studio/1" in " ".join(capsys.readouterr().out.split())
    main(["concepts", "show", "studio/1", "--tracking-uri", store])
    card = " ".join(capsys.readouterr().out.split())
    assert "concepts bundle-cat/1, bundle-dog/1" in card and "serve mlflow models serve -m models:/studio/1" in card
    # a bundle's bare name: its newest version (it has no champion), what its server serves
    main(["concepts", "bundle", "studio", "bundle-cat", "--tracking-uri", store])
    capsys.readouterr()
    main(["concepts", "show", "studio", "--tracking-uri", store])
    assert "studio/2 bundle" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(OnewordError, match="studio is a bundle of concepts, not a concept"):
        catalogue.pull_concept("studio", tmp_path / "studio.safetensors", tracking_uri=store)


SERVING = Path(__file__).resolve().parents[1] / "k8s" / "components" / "serving"


def _serving_doc(name: str, kind: str) -> dict:
    import yaml

    (doc,) = [d for d in yaml.safe_load_all((SERVING / name).read_text()) if d["kind"] == kind]
    return doc


def _merged(into: dict, patch: dict) -> dict:
    """`patch` applied to `into` as a strategic merge patch applies maps (all this patch holds): key by key."""
    out = dict(into)
    for key, value in patch.items():
        out[key] = _merged(into.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _updated(store: str, deployment: dict, scratch: Path) -> dict:
    """The serving overlay's updater, run as its CronJob runs it: the init container's command against `store`,
    then its patch applied to `deployment` as `kubectl patch` applies it. Returns the Deployment after."""
    import os
    import subprocess
    import sys

    pod = _serving_doc("update.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (init,), (pin,) = pod["initContainers"], pod["containers"]
    (mount,) = {m["mountPath"] for c in (init, pin) for m in c["volumeMounts"]}
    patch_file = pin["args"][pin["args"].index("--patch-file") + 1]
    assert patch_file.startswith(f"{mount}/")
    scratch.mkdir(exist_ok=True)
    command = [*init["command"], *(a.replace(f"{mount}/", f"{scratch}/") for a in init["args"])]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return _merged(deployment, json.loads((scratch / Path(patch_file).name).read_text()))


def _server_env(deployment: dict) -> dict[str, str]:
    """The server container's environment from the pod template, as the kubelet fills it in: an annotation the
    template lacks reads as empty."""
    import re

    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    annotations = template["metadata"].get("annotations", {})
    env = {}
    for e in container.get("env", []):
        key = re.fullmatch(r"metadata\.annotations\['(.+)'\]", e["valueFrom"]["fieldRef"]["fieldPath"])[1]
        env[e["name"]] = annotations.get(key, "")
    return env


def _serves(deployment: dict) -> str:
    """The model URI the Deployment's server starts with: its shell command's `-m`, filled in as `sh` would."""
    import re
    import shlex

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    env = _server_env(deployment)
    script = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], container["args"][0])
    words = shlex.split(script)
    return words[words.index("-m") + 1]


def test_the_serving_updater_pins_each_new_bundle_version_and_only_a_new_one(store, tmp_path):
    """update.yaml's CronJob against a real store: the version it pins is the bundle's newest; run again without a
    new version, its patch changes nothing (no rollout); a new version, and the server moves to it."""
    deployment = _serving_doc("serve.yaml", "Deployment")
    assert _serves(deployment) == "models:/studio/latest"  # until the updater first runs
    bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    first = _updated(store, deployment, tmp_path / "1")
    assert _serves(first) == "models:/studio/1"
    assert _updated(store, first, tmp_path / "2") == first  # the same template: Kubernetes rolls nothing out
    bundles.bundle_concepts("studio", ["bundle-cat"], tracking_uri=store)
    assert _serves(_updated(store, first, tmp_path / "3")) == "models:/studio/2"


def test_the_serving_updater_fails_on_a_bundle_the_registry_lacks(store, tmp_path):
    """No version (or no registry): the Job fails, saying why, and the Deployment keeps serving what it served."""
    import subprocess

    with pytest.raises(subprocess.CalledProcessError) as failed:
        _updated(store, _serving_doc("serve.yaml", "Deployment"), tmp_path)
    assert "'studio' not found in the registry" in failed.value.stderr
    assert not (tmp_path / "patch.json").exists() or not (tmp_path / "patch.json").read_text().strip()


@pytest.mark.slow
def test_mlflow_serves_a_bundle_the_request_the_docs_show(store, tmp_path):
    """`mlflow models serve` started as the serving overlay's Deployment starts it, on the version its updater
    pinned (a newer one since lacks a member), sent the very request docs/deploy.md shows (its tokens ours): a row
    per prompt, each drawn by the member it names."""
    import re

    from .conftest import served

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "deploy.md").read_text().split("<!-- bundle-request:", 1)[1]
    sent = re.search(r"-d '(\{.*\})'", doc)[1]
    body = json.loads(sent.replace("<team-a-mug>", "<cat-r>").replace("<my-dog>", "<dog-b>"))
    bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    deployment = _updated(store, _serving_doc("serve.yaml", "Deployment"), tmp_path / "pin")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert _serves(deployment) == "models:/studio/1"
    bundles.bundle_concepts("studio", ["bundle-cat"], tracking_uri=store)  # newer, without <dog-b>: not the one served
    rows = served("models:/studio/1", store, body, tmp_path / "serve.log", [*container["command"], *container["args"]],
                  _server_env(deployment))  # fmt: skip
    assert [r["prompt"] for r in rows] == body["inputs"] and "<cat-r>" in rows[0]["prompt"]
    mlflow.set_tracking_uri(store)
    # the concept's own model, the default sampler, two prompts a call as the request (a batch's size moves the
    # float sums a little)
    alone = mlflow.pyfunc.load_model("models:/bundle-cat@champion").predict([rows[0]["prompt"]] * 2)["png_base64"][0]
    assert np.array_equal(_pixels(alone), _pixels(rows[0]["png_base64"]))


def test_bundling_the_same_versions_again_registers_nothing_and_a_promotion_a_new_version(
    store, evaluated_concept, tmp_path
):
    first = bundles.bundle_concepts("studio", ["bundle-cat", "bundle-dog"], tracking_uri=store)
    again = bundles.bundle_concepts("studio", ["bundle-dog", "bundle-cat@champion"], tracking_uri=store)
    assert (first.version, again.version, again.unchanged) == ("1", "1", True)
    retrained = _another_concept(*evaluated_concept, tmp_path / "cat-2", "<cat-r>", 0.25)
    new_cat = registry.register(*retrained, store, name="bundle-cat")
    catalogue.promote(f"bundle-cat/{new_cat.version}", tracking_uri=store)
    dry = bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store, dry_run=True)
    assert dry.version is None and [m.ref for m in dry.members] == [f"bundle-cat/{new_cat.version}", "bundle-dog/1"]
    assert bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store).version == "2"
    pinned = bundles.bundle_concepts("studio", ["bundle-cat/1", "bundle-dog"], tracking_uri=store)
    assert (pinned.version, pinned.unchanged) == ("3", False)  # the newest differs: version 1 is not looked for
    # a bundle is rolled back as a concept is: by its alias
    assert catalogue.promote("studio/1", alias="live", tracking_uri=store)["before"] is None
    assert str(catalogue.get_version("studio@live", store, bundle=True).version) == "1"


def test_the_bundle_commands_alias_is_the_librarys():
    import inspect

    import typer

    from oneword.cli import app

    option = {p.name: p for p in typer.main.get_command(app).commands["concepts"].commands["bundle"].params}["alias"]
    assert option.default == inspect.signature(bundles.bundle_concepts).parameters["alias"].default == "champion"


def test_what_one_server_cannot_serve_is_refused_by_name(store, evaluated_concept, tmp_path):
    train_dir, eval_dir = evaluated_concept
    for ref, why in ((["bundle-cat/1", "bundle-cat@champion", "bundle-cat/9"], "no version 9"),
                     (["bundle-cat/1", "bundle-*"], None),  # the same version twice: once
                     (["nothing-*"], "no concept named 'nothing-\\*' has @champion"),
                     (["bundle-dog@candidate"], "has no alias @candidate"),
                     (["bundle-*@candidate"], "no concept named 'bundle-\\*' has @candidate")):  # fmt: skip
        if why:
            with pytest.raises(OnewordError, match=why):
                bundles.bundle_concepts("studio", ref, tracking_uri=store, dry_run=True)
        else:
            assert len(bundles.bundle_concepts("studio", ref, tracking_uri=store, dry_run=True).members) == 2
    clash = _another_concept(train_dir, eval_dir, tmp_path / "twin", "<CAT-R>", 1.0)  # the same word but for case
    registry.register(*clash, store, name="cat-twin")
    with pytest.raises(OnewordError, match=r"bundle-cat/1 and cat-twin/1 use tokens a prompt cannot tell apart"):
        bundles.bundle_concepts("studio", ["bundle-cat", "cat-twin"], tracking_uri=store)
    client, fingerprint = mlflow.MlflowClient(store), "oneword.base_model_fingerprint"
    trained_on = catalogue.get_version("bundle-cat", store).tags[fingerprint]
    client.set_model_version_tag("bundle-dog", "1", fingerprint, "sha256:0ther")
    with pytest.raises(OnewordError, match=r"different base models: bundle-cat/1 on .*; bundle-dog/1 on"):
        bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    on_one = bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store, dry_run=True, base_model="0ther")
    assert [m.ref for m in on_one.members] == ["bundle-dog/1"]  # a pattern, narrowed to one base model
    with pytest.raises(OnewordError, match=r"no concept named 'bundle-c\*' has @champion on 0ther"):
        bundles.bundle_concepts("studio", ["bundle-c*"], tracking_uri=store, base_model="0ther")
    client.set_model_version_tag("bundle-dog", "1", fingerprint, trained_on)
    with pytest.raises(OnewordError, match="'bundle-cat' is a concept, not a bundle"):
        bundles.bundle_concepts("bundle-cat", ["bundle-dog"], tracking_uri=store)
    assert not client.search_registered_models(f"tags.`{bundles.BUNDLE_TAG}` = 'true'")  # nothing made by a refusal
    bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    with pytest.raises(OnewordError, match="studio is a bundle of concepts, not a concept: studio/1 holds bundle-cat"):
        bundles.bundle_concepts("more", ["studio/1"], tracking_uri=store)
    with pytest.raises(OnewordError, match="studio is a bundle"):
        catalogue.pull_concept("studio/1", tmp_path / "x.safetensors", tracking_uri=store)
    with pytest.raises(OnewordError, match="the registry holds 'studio' as a bundle of concepts"):  # a concept so named
        registry.register(train_dir, eval_dir, store, name="studio")
    assert [str(mv.version) for mv in client.search_model_versions("name = 'studio'")] == ["1"]


def test_a_bundle_that_fails_leaves_no_copy_and_one_whose_member_is_erased_meanwhile_fails(store, monkeypatch):
    client, made = mlflow.MlflowClient(store), bundles._create_version

    def erased_meanwhile(*args, **kwargs):  # `concepts delete` of a member, after the bundle read its members
        version = made(*args, **kwargs)
        client.delete_registered_model("bundle-dog")
        return version

    monkeypatch.setattr(bundles, "_create_version", erased_meanwhile)
    with pytest.raises(OnewordError, match="bundle-dog/1 was deleted while the bundle was made"):
        bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    assert not client.search_model_versions("name = 'studio'")
    (run,) = client.search_runs([client.get_experiment_by_name(bundles.EXPERIMENT).experiment_id],
                                run_view_type=mlflow.entities.ViewType.ALL)  # fmt: skip
    assert run.info.lifecycle_stage == "deleted" and not _files(run.info.artifact_uri)
    assert not client.search_logged_models([run.info.experiment_id])


def test_old_bundle_versions_are_pruned_as_a_concepts_are(store, capsys):
    for members in (["bundle-cat"], ["bundle-dog"], ["bundle-*"], ["bundle-cat"]):
        bundles.bundle_concepts("studio", members, tracking_uri=store)
    catalogue.promote("studio/1", alias="live", tracking_uri=store)
    main(["concepts", "prune", "--keep", "2", "--tracking-uri", store])
    assert "deleted 1 version of 1 concept" in " ".join(capsys.readouterr().out.split())  # studio/2
    client = mlflow.MlflowClient(store)
    assert sorted(int(mv.version) for mv in client.search_model_versions("name = 'studio'")) == [1, 3, 4]
    assert [int(mv.version) for mv in client.search_model_versions("name = 'bundle-cat'")] == [1]


def _pixels(png_base64: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))))


def _files(uri: str) -> list[Path]:
    return [f for f in Path(uri.removeprefix("file://")).rglob("*") if f.is_file()]


def test_generate_draws_with_a_bundles_own_copies(store, tmp_path, capsys):
    bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    mlflow.MlflowClient(store).delete_model_version("bundle-cat", "1")  # pruned: the bundle still holds it
    out = tmp_path / "drawn"
    main(["generate", "--concept", "studio/1", "<cat-r> beside <dog-b>", "-o", str(out), "--n", "1", "--steps", "2",
          "--tracking-uri", store])  # fmt: skip
    assert (out / "grid.png").is_file(), capsys.readouterr()


def test_a_concept_named_alone_and_in_its_bundle_draws_once_and_two_of_its_versions_are_refused(
    store, evaluated_concept, tmp_path, capsys
):
    bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    out = tmp_path / "drawn"
    args = ["<cat-r> beside <dog-b>", "-o", str(out), "--n", "1", "--steps", "2", "--tracking-uri", store]
    main(["generate", "--concept", "bundle-dog", "--concept", "studio/1", *args])
    assert (out / "grid.png").is_file(), capsys.readouterr()
    retrained = _another_concept(*evaluated_concept, tmp_path / "dog-2", "<dog-b>", 0.75)
    other = registry.register(*retrained, store, name="bundle-dog").version  # the same token, other vectors
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--concept", f"bundle-dog/{other}", "--concept", "studio/1", *args])
    assert "two embeddings use the token '<dog-b>'" in capsys.readouterr().err


def test_erasing_a_concept_deletes_the_bundle_versions_that_copy_it(store, tmp_path, capsys):
    """A bundle holds a copy of each member's embedding: a concept erased must not keep serving from one."""
    client = mlflow.MlflowClient(store)
    orphan = bundles.bundle_concepts("studio", ["bundle-cat"], tracking_uri=store)
    orphan_run = client.get_model_version("studio", orphan.version).run_id
    client.delete_model_version("studio", orphan.version)  # by hand: its run keeps the copy, no version finds it
    kept = bundles.bundle_concepts("studio", ["bundle-dog"], tracking_uri=store)
    both = bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    run = client.get_run(client.get_model_version("studio", both.version).run_id)
    copies = [m.artifact_location for m in client.search_logged_models([run.info.experiment_id])]
    main(["concepts", "delete", "bundle-cat", "--tracking-uri", store])
    assert "1 bundle version holding it (studio/3)" in " ".join(capsys.readouterr().out.split())
    main(["concepts", "delete", "bundle-cat", "--yes", "--tracking-uri", store])
    assert "1 bundle version holding it (studio/3)" in " ".join(capsys.readouterr().out.split())
    assert [str(mv.version) for mv in client.search_model_versions("name = 'studio'")] == [kept.version]
    for run_id in (run.info.run_id, orphan_run):
        erased = client.get_run(run_id).info
        assert erased.lifecycle_stage == "deleted" and not _files(erased.artifact_uri)
    assert len(copies) == 3 and [bool(_files(c)) for c in copies].count(True) == 1  # the dog's bundle keeps its own
    assert bundles.bundle_concepts("studio", ["bundle-dog"], tracking_uri=store).version == kept.version
    kept_run = client.get_model_version("studio", kept.version).run_id
    gone = catalogue.delete_concept("studio", store)  # a bundle's own name: the bundle alone
    assert gone["versions"] == [kept.version] and gone["bundle_versions"] == []
    assert kept_run in gone["runs"]
    assert catalogue.get_version("bundle-dog", store) and not client.search_registered_models("name = 'studio'")
    with pytest.raises(OnewordError, match="no concept or bundle named 'studio'"):
        catalogue.delete_concept("studio", store)
    # a bundle whose last version went: there, and empty ("no version 0" of a "concept", "no concept named")
    empty = bundles.bundle_concepts("empty", ["bundle-dog"], tracking_uri=store)
    client.delete_model_version("empty", empty.version)
    with pytest.raises(OnewordError, match="bundle 'empty' has no versions left"):
        catalogue.get_version("empty", store, bundle=True)
    assert catalogue.prune_versions(store, names=["empty"]) == []


def _manifest(path: Path, *names_and_tokens: tuple[str, str]) -> Path:
    """A concepts manifest of these concepts (their photos need not exist: a bundle reads the registry)."""
    import yaml

    entries = [{"images": f"photos/{n}", "token": t, "init_word": "cat", "name": n} for n, t in names_and_tokens]
    path.write_text(yaml.safe_dump({"concepts": entries}))
    return path


def test_a_manifests_bundle_holds_its_champions_and_says_why_the_others_are_left_out(store, tmp_path, capsys):
    """`concepts bundle NAME --manifest` (what a batch run's bundle step does): each concept with a champion on the
    base model; one not registered yet, or on another base model, left out and said so, none refused."""
    manifest = _manifest(tmp_path / "concepts.yaml", ("bundle-cat", "<cat-r>"), ("bundle-new", "<new-r>"),
                         ("bundle-dog", "<dog-b>"))  # fmt: skip
    main(["concepts", "bundle", "studio", "--manifest", str(manifest), "--tracking-uri", store])
    said = " ".join(capsys.readouterr().out.split())
    assert "left out bundle-new: no @champion version" in said and "registered studio/1: 2 concepts on" in said
    assert catalogue.show_concept("studio/1", store)["tags"][bundles.MEMBERS_TAG] == "bundle-cat/1,bundle-dog/1"
    trained_on = catalogue.get_version("bundle-cat", store).tags["oneword.base_model"]
    again = bundles.bundle_concepts("studio", manifest=str(manifest), tracking_uri=store, base_model=trained_on)
    assert (again.version, again.unchanged, again.left_out) == ("1", True, {"bundle-new": "no @champion version"})
    assert again.summary() == {"name": "studio", "version": "1", "unchanged": True,
                               "members": ["bundle-cat/1", "bundle-dog/1"], "left_out": again.left_out}  # fmt: skip
    main(["concepts", "bundle", "studio", "--manifest", str(manifest), "--base-model", "toyworld",
          "--tracking-uri", store])  # fmt: skip
    said = " ".join(capsys.readouterr().out.split())
    assert f"left out bundle-cat: its @champion (bundle-cat/1) was trained on {trained_on}" in said
    assert "nothing to bundle: no concept of" in said and "Nothing was registered" in said
    # named concepts beside a manifest's: a version named by hand that is a manifest concept's champion, once
    both = bundles.bundle_concepts("studio", ["bundle-dog/1"], manifest=str(manifest), tracking_uri=store)
    assert both.unchanged and both.version == "1"
    with pytest.raises(OnewordError, match=r"bundle 'bundle-new' is also a concept of .*concepts.yaml"):
        bundles.bundle_concepts("bundle-new", manifest=str(manifest), tracking_uri=store)
    with pytest.raises(OnewordError, match="names no concept"):
        bundles.bundle_concepts("studio", tracking_uri=store)
    # a bundle is its manifest's: another manifest's runs would make it hold their concepts alone, night by night
    other = _manifest(tmp_path / "other.yaml", ("bundle-dog", "<dog-b>"))
    with pytest.raises(OnewordError, match=r"bundle 'studio' holds the concepts of another manifest, .*concepts.yaml"):
        bundles.bundle_concepts("studio", manifest=str(other), tracking_uri=store, batch_id="b-7")  # a batch's step
    with pytest.raises(OnewordError, match="holds the concepts of another manifest"):  # before a batch trains
        bundles.check_bundle_name("studio", ["bundle-dog"], store, str(other))
    # by hand without a manifest: the next batch would undo it, so it is refused, naming the manifest that keeps it
    with pytest.raises(OnewordError, match=r"bundle 'studio' is kept by manifest .*concepts.yaml") as refused:
        bundles.bundle_concepts("studio", ["bundle-dog"], tracking_uri=store, dry_run=True)
    assert f"oneword concepts bundle studio --manifest {manifest}" in refused.value.hint
    assert bundles.bundle_concepts("studio-dog", ["bundle-dog"], tracking_uri=store).version == "1"  # a name of its own
    listed = {r["name"]: r for r in bundles.list_bundles(store)}
    assert list(listed) == ["studio", "studio-dog"] and listed["studio"]["manifest"] == str(manifest)
    assert (listed["studio"]["version"], listed["studio"]["members"]) == ("1", ["bundle-cat/1", "bundle-dog/1"])
    assert (listed["studio-dog"]["manifest"], listed["studio-dog"]["members"]) == ("", ["bundle-dog/1"])
    capsys.readouterr()
    main(["concepts", "bundles", "--tracking-uri", store])
    table = capsys.readouterr().out
    assert max(map(len, table.splitlines())) <= 80 and "by hand" in table
    assert re.search(r"studio +1 +2 +model +/tmp", table) and re.search(r"studio-dog +1 +1 +model +by hand", table)
    mlflow.MlflowClient(store).create_registered_model("studio-gone", tags={registry.BUNDLE_TAG: "true"})
    main(["concepts", "bundles", "--tracking-uri", store])  # its versions went with a concept deleted since
    table = capsys.readouterr().out
    assert re.search(r"studio-gone +- +0 +- +by hand", table) and "studio-gone has no versions left" in table
    # by hand with a manifest (the first one moved, say): the bundle becomes that one's, and the first's refused
    assert bundles.bundle_concepts("studio", manifest=str(other), tracking_uri=store).version == "2"
    mlflow.MlflowClient(store).set_registered_model_alias("studio", "live", "1")  # a rollback: its server serves 1
    main(["concepts", "bundles", "--tracking-uri", store])
    assert "studio: @live is version 1, not its newest" in capsys.readouterr().out
    with pytest.raises(OnewordError, match=r"holds the concepts of another manifest, .*other.yaml"):
        bundles.check_bundle_name("studio", [], store, str(manifest))


def test_a_retried_bundle_step_says_it_registered_the_version_it_finds_its_own(store, tmp_path):
    """A bundle step tried again (an evicted pod) after it registered finds the newest version its own (its run
    is tagged with the batch): "registered", as a step that registered; another batch finds it unchanged."""
    manifest = str(_manifest(tmp_path / "concepts.yaml", ("bundle-cat", "<cat-r>"), ("bundle-dog", "<dog-b>")))
    first = bundles.bundle_concepts("studio", manifest=manifest, tracking_uri=store, batch_id="b-1")
    again = bundles.bundle_concepts("studio", manifest=manifest, tracking_uri=store, batch_id="b-1")
    later = bundles.bundle_concepts("studio", manifest=manifest, tracking_uri=store, batch_id="b-2")
    assert [(b.version, b.unchanged) for b in (first, again, later)] == [("1", False), ("1", False), ("1", True)]
    with pytest.raises(OnewordError, match="bundle name 'a b' is not one oneword can look up"):
        bundles.check_bundle_name("a b", [], store)


def test_a_batch_whose_bundle_is_a_concepts_name_stops_before_it_plans(store, tmp_path):
    """A bundle named as one of the manifest's concepts (or as another registered concept) would take the name that
    concept registers under: the plan stops before it records anything, and the local run before it starts."""
    from oneword.batch_records import batch_plan
    from oneword.pipelines.local import batch_plan as local_plan
    from oneword.pipelines.local import run_batch
    from oneword.plan import plan_batch

    manifest = str(_manifest(tmp_path / "concepts.yaml", ("mine", "<mine>")))
    for bundle, why in (("mine", r"bundle 'mine' is also a concept of .*concepts.yaml"),
                        ("bundle-cat", "'bundle-cat' is a concept, not a bundle")):  # fmt: skip
        with pytest.raises(OnewordError, match=why):
            plan_batch(manifest, "b-1", {}, tracking_uri=store, bundle=bundle)
        with pytest.raises(OnewordError, match=why):
            run_batch(manifest, tmp_path / "root", store, bundle=bundle)
        with pytest.raises(OnewordError, match=why):  # `oneword batch --dry-run` says it as a run would
            local_plan(manifest, store, bundle=bundle, base_model="toyworld")
    assert batch_plan(store, "b-1") is None and not (tmp_path / "root").exists()


def test_a_promotion_while_a_bundle_is_made_is_bundled_too(store, evaluated_concept, tmp_path, monkeypatch):
    """A batch's runs may end together: a champion that moves between a bundle's read of its members and its
    registration (another run's register) is read again, and a newer version holds it."""
    made, moved = bundles._create_version, []

    def promoted_meanwhile(*args, **kwargs):
        version = made(*args, **kwargs)
        if not moved:
            retrained = _another_concept(*evaluated_concept, tmp_path / "cat-2", "<cat-r>", 0.25)
            moved.append(registry.register(*retrained, store, name="bundle-cat").version)
            catalogue.promote(f"bundle-cat/{moved[0]}", tracking_uri=store)
        return version

    monkeypatch.setattr(bundles, "_create_version", promoted_meanwhile)
    manifest = _manifest(tmp_path / "concepts.yaml", ("bundle-cat", "<cat-r>"), ("bundle-dog", "<dog-b>"))
    done = bundles.bundle_concepts("studio", manifest=str(manifest), tracking_uri=store)
    assert (done.version, done.unchanged) == ("2", False)
    assert [m.ref for m in done.members] == [f"bundle-cat/{moved[0]}", "bundle-dog/1"]
    newest = catalogue.show_concept("studio/2", store)["tags"][bundles.MEMBERS_TAG]
    assert newest == f"bundle-cat/{moved[0]},bundle-dog/1"


def _bundle_at_once(manifest: str, uri: str, barrier) -> tuple[str, bool]:
    barrier.wait(timeout=120)
    made = bundles.bundle_concepts("studio", manifest=manifest, tracking_uri=uri)
    return made.version, made.unchanged


def test_bundles_of_one_manifest_made_at_once_by_two_processes_are_one_version(store, tmp_path):
    """Two runs of a manifest's batch (`oneword submit` splits one into several) bundle at their ends, maybe at
    the same moment: real processes on one SQLite store that read the registry together both succeed, and name
    one version holding every champion; the one that registered a second copy deleted it, run and all."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    manifest = str(_manifest(tmp_path / "concepts.yaml", ("bundle-cat", "<cat-r>"), ("bundle-dog", "<dog-b>")))
    barrier = spawn.Manager().Barrier(2)
    with spawn.Pool(2) as pool:
        said = pool.starmap(_bundle_at_once, [(manifest, store, barrier)] * 2)
    client = mlflow.MlflowClient(store)
    versions = client.search_model_versions("name = 'studio'")
    assert [str(mv.version) for mv in versions] == ["1"], said
    assert versions[0].tags[bundles.MEMBERS_TAG] == "bundle-cat/1,bundle-dog/1"
    assert sorted(said) == [("1", False), ("1", True)]  # one registered it; the other finds it held already
    runs = client.search_runs([client.get_experiment_by_name(bundles.EXPERIMENT).experiment_id],
                              run_view_type=mlflow.entities.ViewType.ALL)  # fmt: skip
    kept = [r for r in runs if r.info.lifecycle_stage == "active"]
    assert [r.info.run_id for r in kept] == [versions[0].run_id]
    for gone in (r for r in runs if r.info.lifecycle_stage != "active"):  # MLflow keeps a record until `mlflow gc`
        assert not client.list_artifacts(gone.info.run_id)


def test_a_bundle_step_that_fails_records_why_where_the_batchs_report_reads_it(store, evaluated_concept, tmp_path):
    """The pipeline's `bundle-concepts` fails the run where the bundle cannot be made (the concepts stay
    registered), and records why in the batch's plan, whence the exit handler's report says it."""
    from oneword.batch import final_report
    from oneword.batch_records import batch_bundle, batch_plan, record_plan
    from oneword.pipelines.components import bundle_concepts as step

    registry.register(*_another_concept(*evaluated_concept, tmp_path / "twin", "<CAT-R>", 1.0), store, name="cat-twin")
    # the manifest gave cat-twin a token of its own since; its champion, trained before, answers to the other
    manifest = str(_manifest(tmp_path / "concepts.yaml", ("bundle-cat", "<cat-r>"), ("cat-twin", "<twin>")))
    record_plan(store, "b-8", [{"name": "bundle-cat"}, {"name": "cat-twin"}])
    step.python_func(bundle="", concepts_manifest=manifest, batch_id="b-8", tracking_uri=store)  # none asked for
    assert batch_bundle(store, "b-8") is None
    record_plan(store, "b-9", [{"name": "bundle-cat"}, {"name": "cat-twin"}], bundle="studio")
    with pytest.raises(OnewordError, match="cannot tell apart"):
        step.python_func(bundle="studio", concepts_manifest=manifest, batch_id="b-9", tracking_uri=store)
    report = final_report(store, "b-9", lambda: batch_plan(store, "b-9"), registry.EXPERIMENT, "FAILED",
                          bundle=lambda: batch_bundle(store, "b-9"))  # fmt: skip
    assert report["bundle"]["name"] == "studio"
    assert report["bundle"]["error"].startswith("bundle-cat/1 and cat-twin/1 use tokens a prompt cannot tell apart")
    assert "(bundle one of them, or export one under another token" in report["bundle"]["error"]  # the hint
    assert not mlflow.MlflowClient(store).search_registered_models("name = 'studio'")
    # a run that ended before its bundle step (a shard failed, the run was stopped) says so of the bundle it asked
    record_plan(store, "b-10", [{"name": "bundle-cat"}], bundle="studio")
    assert batch_bundle(store, "b-10") == {"name": "studio", "error": "not made: the run ended before its "
                                           "bundle-concepts step (a step before it failed, or the run was stopped); "
                                           "the bundle is as it was"}  # fmt: skip
    record_plan(store, "b-11", [{"name": "bundle-cat"}])
    assert batch_bundle(store, "b-11") is None  # it asked for none


def test_requests_drawn_at_once_are_each_what_they_would_be_alone(store):
    """MLflow's scoring server runs requests in threads: two at once, with other step counts, share one pipeline
    (and its scheduler's timesteps), and each must draw what it draws alone."""
    from concurrent.futures import ThreadPoolExecutor

    bundles.bundle_concepts("studio", ["bundle-*"], tracking_uri=store)
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model("models:/studio/1")
    asks = [(["a photo of <cat-r>"] * 2, {"n": 2, "steps": 3, "seed": 1}),
            (["<dog-b> on the moon"], {"n": 3, "steps": 5, "seed": 2})]  # fmt: skip
    alone = [model.predict(prompts, params=params)["png_base64"].tolist() for prompts, params in asks]
    for _ in range(2):
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda a: model.predict(a[0], params=a[1])["png_base64"].tolist(), asks))
        assert together == alone
