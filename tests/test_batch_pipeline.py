"""The batch pipeline run for real on this machine (kfp.local): one concept's failure, then a night with no change.

In a file of its own so that, with one test file per worker (`make test`), it runs beside test_pipelines.py's
single-concept run instead of after it.
"""

import json
from pathlib import Path

import pytest
import yaml

from oneword import batch_records, catalogue

from .conftest import DREAMBENCH


def _told(run_dir: Path, task: str) -> list[dict]:
    """The metrics each run of `task` logged (what the KFP dashboard shows of it)."""
    return [json.loads(p.read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
            for p in run_dir.rglob(f"{task}/executor_output.json")]  # fmt: skip


@pytest.mark.slow
def test_batch_with_a_broken_concept_registers_the_others(tiny_model_dir, tiny_clip_dir, tmp_path, monkeypatch):
    from oneword.pipelines.local import run_batch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    manifest = tmp_path / "concepts.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "concepts": [
                    {"images": str(DREAMBENCH / "cat"), "token": "<cat-q>", "init_word": "cat", "learning_rate": 0.004},
                    {"images": str(bad), "token": "<bad-q>", "init_word": "dog"},
                    {"images": str(DREAMBENCH / "dog"), "token": "<dog-q>", "init_word": "dog"},
                    {"images": str(DREAMBENCH / "dog"), "token": "dog", "init_word": "dog", "name": "dog-word"},
                ]
            }
        )
    )
    settings = dict(
        concepts_per_shard=4,  # one shard: the broken concepts are told apart before their shard-mates train
        base_model=str(tiny_model_dir),
        resolution=32,
        steps=4,
        checkpoint_every=2,
        n_images=2,
        sampling_steps=2,
        checkpoint_budget=0,
        clip_model=str(tiny_clip_dir),
        bundle="night",  # after every concept: the manifest's champions, served by one model
    )
    report = run_batch(str(manifest), tmp_path / "root", **settings)
    status = {c["name"]: c for c in report["concepts"]}
    assert status["cat-q"]["status"] == "registered" and status["dog-q"]["status"] == "registered"
    assert status["bad-q"]["status"] == "failed" and status["bad-q"]["stage"] == "preprocess"
    assert "a.jpg" in status["bad-q"]["error"]
    assert (status["dog-word"]["stage"], status["dog-word"]["status"]) == ("train", "failed")  # a word it has
    assert "already in the vocabulary" in status["dog-word"]["error"]
    assert (report["registered"], report["failed"]) == (2, 2)
    untrained = {"bad-q": "no @champion version", "dog-word": "no @champion version"}
    assert report["bundle"] == {"name": "night", "version": "1", "unchanged": False,
                                "members": ["cat-q/1", "dog-q/1"], "left_out": untrained}  # fmt: skip
    from rich.console import Console

    from oneword.cli.run import print_batch_report

    console = Console(width=80, record=True)
    assert print_batch_report(report, console) == 1  # `oneword batch` exits 1: a concept failed
    text = console.export_text()
    paths = ("run_dir", "tracking_uri", "overview")  # printed whole, to copy
    table = [line for line in text.splitlines() if not line.lstrip().startswith(paths)]
    assert "bad-q" in text and "preprocess" in text and max(len(line) for line in table) <= 80
    assert "bundle night/1 registered: 2 concepts (left out: bad-q: no @champion version" in " ".join(text.split())
    # each version's scores in the table, as the registry holds them; the overview page, where the terminal says
    cat = status["cat-q"]
    assert 0 < cat["reconstruction"] <= 1 and f"{cat['reconstruction']:.2f}" in text.split("cat-q", 1)[1].split()[:5]
    page = report["overview"]
    assert page.endswith("overview.html") and f"overview      {page}" in text
    html = Path(page).read_text()
    assert html.count("data:image/") == 2 and "already in the vocabulary" in html  # the two grids; why dog-word failed
    assert "getElementById('v-cat-q-1')" in html and 'id="v-cat-q-1"' in html
    assert "bundle night/1 registered: 2 concepts" in html
    assert catalogue.show_concept("night/1", report["tracking_uri"])["tags"]["oneword.members"] == "cat-q/1,dog-q/1"
    names = {r["name"] for r in catalogue.list_concepts(report["tracking_uri"])}
    assert names == {"cat-q", "dog-q"}
    # the five steps, each with its own artifacts: per concept preprocess/cache_latents/evaluate/register, one train;
    # the broken concepts (photos that do not read, a token the model has) were told on CPU first (by the plan),
    # so no step ran for them
    run_dir = Path(report["run_dir"])
    # the plan told the broken two (on CPU, once for the run); the shard's own lookup took its concepts as told
    assert _told(run_dir, "plan-batch") == [{"told": 2, "to_train": 2, "deferred": 0}]
    assert _told(run_dir, "changed-concepts") == [{"told": 0, "to_train": 2}]
    (group,) = run_dir.rglob("train/model/concepts.json")
    assert [r["name"] for r in json.loads(group.read_text())] == ["cat-q", "dog-q"]
    assert len(list(run_dir.rglob("preprocess/dataset"))) == 2 and len(list(run_dir.rglob("register"))) == 2
    assert len(list(run_dir.rglob("evaluate/evaluation/metrics.json"))) == 2
    # what the steps had, not what a cluster run would ask for: this machine has no GPU
    assert [(m["accelerator"], m["accelerator_requested"]) for m in _told(run_dir, "evaluate")] == [
        ("cpu", "1 x nvidia.com/gpu")] * 2  # fmt: skip
    # the report read the plan the run made (recorded in MLflow), not the manifest again
    plan = batch_records.batch_plan(report["tracking_uri"], report["batch_id"])
    assert [c["name"] for c in plan] == ["cat-q", "bad-q", "dog-q", "dog-word"] and all(c["content_key"] for c in plan)
    params = catalogue.show_concept("cat-q/1", report["tracking_uri"])["params"]
    assert params["learning_rate"] == "0.004" and float(params["train.learning_rate_used"]) == 0.004 * 4
    # what the next night would do, asked without running it (`oneword batch --dry-run`)
    from oneword.cli.run import print_batch_plan
    from oneword.pipelines.local import batch_plan

    told = batch_plan(str(manifest), report["tracking_uri"], **settings)
    plan = told["concepts"]
    assert told["registry"] and told["tracking_uri"] == report["tracking_uri"]
    assert [(r["name"], r["status"], r["version"], r["alias"]) for r in plan] == [
        ("cat-q", "unchanged", "1", "champion"), ("bad-q", "fails at preprocess", "", ""),
        ("dog-q", "unchanged", "1", "champion"), ("dog-word", "fails at train", "", ""),
    ]  # fmt: skip
    assert "a.jpg" in plan[1]["why"] and "already in the vocabulary" in plan[3]["why"]  # what a run would record
    other = batch_plan(str(manifest), report["tracking_uri"], **{**settings, "steps": 5})["concepts"]
    assert [r["status"] for r in other] == ["to train", "fails at preprocess", "to train", "fails at train"]
    assert other[0]["why"] == "v1 was trained or evaluated otherwise (photos, settings, model, or how oneword scores)"
    # the same name under another token: serving prompts name the old one, and the dry run says so
    renamed = tmp_path / "renamed.yaml"
    entry = {**yaml.safe_load(manifest.read_text())["concepts"][0], "token": "<cat-z>", "name": "cat-q"}
    renamed.write_text(yaml.safe_dump({"concepts": [entry]}))
    # (another manifest: the first's bundle is not its)
    (row,) = batch_plan(str(renamed), report["tracking_uri"], **{**settings, "bundle": ""})["concepts"]
    assert row["status"] == "to train" and row["why"].endswith(
        "; its token changes: the champion (v1) answers to <cat-q>, this to <cat-z>")  # fmt: skip
    console = Console(width=80, record=True)
    print_batch_plan(told, console)
    text = console.export_text()
    table = [line for line in text.splitlines() if not line.lstrip().startswith("registry")]  # a path, whole
    assert "0 to train, 2 unchanged, 2 would fail" in text and max(len(line) for line in table) <= 80
    # the next night, nothing changed but the manifest's order, and so the shard: the unchanged concepts, and the
    # broken one's photos, are told on CPU, before any GPU step, and none runs
    entries = yaml.safe_load(manifest.read_text())["concepts"]
    manifest.write_text(yaml.safe_dump({"concepts": entries[::-1]}))
    again = run_batch(str(manifest), tmp_path / "root", **settings)
    assert {c["name"]: c["status"] for c in again["concepts"]} == {
        "cat-q": "unchanged", "bad-q": "failed", "dog-q": "unchanged", "dog-word": "failed"
    }  # fmt: skip
    assert [r["version"] for r in catalogue.list_concepts(report["tracking_uri"]) if r["name"] == "cat-q"] == ["1"]
    night = Path(again["run_dir"])
    assert _told(night, "plan-batch") == [{"told": 4, "to_train": 0, "deferred": 0}]  # the run's dashboard shows it
    assert not list(night.rglob("changed-concepts"))  # the plan made no shard: no task of the five steps ran
    # the unchanged two are recorded in the plan's own run, not in a run each: the night added the plan, and a
    # FAILED run for each broken concept
    client = __import__("mlflow").MlflowClient(report["tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    night_runs = client.search_runs(experiments, f"tags.`oneword.batch_id` = '{again['batch_id']}'")
    assert sorted(r.data.tags.get("oneword.kind", r.info.status) for r in night_runs) == ["FAILED", "FAILED",
                                                                                          "batch-plan"]
    assert not list(night.rglob("preprocess")) and not list(night.rglob("cache-latents"))  # no task, no GPU pod
    broken = next(c for c in again["concepts"] if c["name"] == "bad-q")  # its photos' error, told on CPU
    assert broken["stage"] == "preprocess" and "a.jpg" in broken["error"]
    assert not list(night.rglob("train/model/*/summary.json"))
    assert not list(night.rglob("evaluate/evaluation/metrics.json"))
    assert again["left"] == []  # the same concepts, in another order
    assert (again["bundle"]["version"], again["bundle"]["unchanged"]) == ("1", True)  # the same champions
    # a changed evaluation: evaluated again, but not trained again (its training was kept); a concept taken out
    # of the manifest is reported, as it still holds its alias
    manifest.write_text(yaml.safe_dump({"concepts": [e for e in entries if e["token"] != "<dog-q>"]}))
    third = run_batch(str(manifest), tmp_path / "root", **{**settings, "n_images": 3})
    assert {c["name"]: c["status"] for c in third["concepts"]}["cat-q"] == "registered"
    (summary,) = [json.loads(p.read_text()) for p in Path(third["run_dir"]).rglob("train/model/*/summary.json")]
    assert summary["concept"]["token"] == "<cat-q>"
    assert summary["steps_run"] == 0 and "/trainings/" in summary["trained_before"]
    assert third["left"] == [{"name": "dog-q", "aliases": {"champion": "1"}}]
    console = Console(width=80, record=True)
    print_batch_report(third, console)
    text = console.export_text()
    assert "still holding an alias: dog-q (champion v1)" in " ".join(text.split())
    paths = ("run_dir", "tracking_uri", "overview")  # printed whole, to copy
    table = [line for line in text.splitlines() if not line.lstrip().startswith(paths)]
    assert max(len(line) for line in table) <= 80
    # a run of one of the manifest's concepts (`oneword batch --only-concepts`): it plans that one alone, and is
    # no night of the manifest: the concepts it leaves out did not leave the manifest
    cat_now = catalogue.get_version("cat-q@champion", report["tracking_uri"]).version
    manifest.write_text(yaml.safe_dump({"concepts": entries}))
    fourth = run_batch(str(manifest), tmp_path / "root", **{**settings, "only_concepts": ["dog-q"]})
    assert [(c["name"], c["status"]) for c in fourth["concepts"]] == [("dog-q", "unchanged")]
    # the third run's bundle held cat-q alone (dog-q had left the manifest); this one, the whole manifest's again
    assert [third["bundle"]["members"], fourth["bundle"]["version"]] == [[f"cat-q/{cat_now}"], "3"]
    assert fourth["bundle"]["members"] == [f"cat-q/{cat_now}", "dog-q/1"]
    assert _told(Path(fourth["run_dir"]), "plan-batch") == [{"told": 1, "to_train": 0, "deferred": 0}]
    assert fourth["left"] == []  # cat-q, out of this run, still holds @champion
