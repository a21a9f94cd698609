"""What two processes can touch at once: the local MLflow store and the registry, with real processes.

kfp.local runs a batch's ParallelFor iterations as parallel processes, and a cluster runs many `register` pods
at once, so every test here starts real processes that meet at a barrier and then act at the same moment.
"""

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import mlflow
import pytest

from oneword import batch_records, catalogue, registry, tracking
from oneword.errors import OnewordError

from .conftest import DREAMBENCH

SPAWN = mp.get_context("spawn")  # a fresh interpreter each, as kfp.local's subprocesses are


def _open_store(uri: str, barrier) -> int:
    barrier.wait(timeout=120)
    _, client = tracking.client(uri)  # as every writer opens it (a query refuses a store that is not there)
    return len(client.search_registered_models())


def _register(train_dir: str, eval_dir: str, uri: str, name: str, barrier) -> tuple[str, str]:
    barrier.wait(timeout=120)
    r = registry.register(train_dir, eval_dir, uri, name=name, batch_id="b-1")
    return r.version, r.alias


def _promote(ref: str, uri: str, barrier) -> dict | str:
    from oneword.errors import OnewordError

    barrier.wait(timeout=120)
    try:
        return catalogue.promote(ref, reason=f"by {ref}", tracking_uri=uri)
    except OnewordError as e:
        return e.message


def _with_scores(eval_dir, out, reconstruction, editability):
    shutil.copytree(eval_dir, out)
    m = json.loads((out / "metrics.json").read_text())
    shift = reconstruction + editability - m["reconstruction"] - m["editability"]
    m["score_per_seed"] = [x + shift for x in m["score_per_seed"]]
    m["reconstruction"], m["editability"] = reconstruction, editability
    (out / "metrics.json").write_text(json.dumps(m))
    return out


def test_a_fresh_local_store_opened_by_four_processes_at_once(tmp_path):
    """Each process's first open makes the store; unguarded, MLflow's migrations collide and break it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = 4
    barrier = SPAWN.Manager().Barrier(n)
    with SPAWN.Pool(n) as pool:
        counts = pool.starmap(_open_store, [(uri, barrier)] * n)
    assert counts == [0] * n
    # and the store is whole afterwards: a new client can write and read it
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("after")
    assert client.get_experiment(exp).name == "after"
    assert tracking.sqlite_path(uri).exists()


def test_a_damaged_store_is_a_clear_error(tmp_path):
    import sqlite3

    from oneword.errors import OnewordError

    db = tmp_path / "mlflow.db"
    tracking.ensure_store(f"sqlite:///{db}")
    with sqlite3.connect(db) as c:
        c.execute("DROP TABLE alembic_version")
    with pytest.raises(OnewordError, match="cannot open the MLflow store") as e:
        tracking.ensure_store(f"sqlite:///{tmp_path}/./mlflow.db")  # the same file, a URI not opened yet
    assert str(tmp_path) in str(e.value) and "mlflow db upgrade" in e.value.hint
    # one cut short (a copy that stopped, a disk that failed) is said as damaged, in SQLite's words, not SQL
    cut = tmp_path / "cut.db"
    cut.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    with pytest.raises(OnewordError, match=r"the store.s database said: .*(malformed|not a database)") as e:
        tracking.ensure_store(f"sqlite:///{cut}")
    assert f"{cut} is damaged: restore it from a backup" in e.value.hint and "SELECT" not in e.value.message
    # a lock that cannot be taken in a folder that can be written (another user's lock file): said, not passed
    # over (an unguarded migration could meet another's)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    tracking.ensure_store(f"sqlite:///{fresh / 'mlflow.db'}")
    (fresh / "mlflow.db.lock").unlink(missing_ok=True)
    (fresh / "mlflow.db.lock").mkdir()  # where the lock file would go: it cannot be made
    with pytest.raises(OnewordError, match=f"cannot take the MLflow store's lock {fresh / 'mlflow.db'}.lock"):
        tracking.ensure_store(f"sqlite:///{fresh}/./mlflow.db")  # not opened yet in this process
    (fresh / "new.db.lock").mkdir()  # and a store not made yet there: said, naming it
    with pytest.raises(OnewordError, match=f"cannot make the MLflow store {fresh / 'new.db'}"):
        tracking.ensure_store(f"sqlite:///{fresh}/new.db")


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_concurrent_registrations(store, evaluated_concept, tmp_path, request):
    """Four registrations at once: two of one concept (different scores), two of others.

    Versions are distinct, every concept is registered, and the champion of the shared concept ends on the
    better of its two versions, whichever process got there first.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server")
    train_dir, eval_dir = evaluated_concept
    good = _with_scores(eval_dir, tmp_path / "good", 0.8, 0.4)
    worse = _with_scores(eval_dir, tmp_path / "worse", 0.5, 0.3)
    shared = f"shared-{store}"
    jobs = [
        (str(train_dir), str(good), uri, shared),
        (str(train_dir), str(worse), uri, shared),
        (str(train_dir), str(eval_dir), uri, f"alone-a-{store}"),
        (str(train_dir), str(eval_dir), uri, f"alone-b-{store}"),
    ]
    barrier = SPAWN.Manager().Barrier(len(jobs))
    with SPAWN.Pool(len(jobs)) as pool:
        results = pool.starmap(_register, [(*j, barrier) for j in jobs])
    assert sorted(v for v, _ in results[:2]) == ["1", "2"]
    assert results[2] == ("1", "champion") and results[3] == ("1", "champion")
    ours = (shared, f"alone-a-{store}", f"alone-b-{store}")  # the worker's server holds other files' concepts
    rows = {(r["name"], r["version"]): r for r in catalogue.list_concepts(uri) if r["name"] in ours}
    champions = [v for (n, v), r in rows.items() if n == shared and "champion" in r["aliases"]]
    good_version = results[0][0]
    assert champions == [good_version], rows
    assert all(r["gate"] for r in rows.values())  # every version's alias was decided


@pytest.mark.slow
def test_one_training_registered_by_two_runs_at_once_is_one_version(evaluated_concept, tmp_path):
    """Two batches (or two `oneword run`s) of one concept at once: each evaluate finds nothing registered yet, and
    both register the same training, evaluated the same way. One version; the other registration keeps it."""
    from oneword.batch import batch_report
    from oneword.config import EvalConfig
    from oneword.evaluation.protocol import evaluation_key

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_dir, eval_dir = evaluated_concept
    trained = tmp_path / "trained"
    shutil.copytree(train_dir, trained)
    summary = json.loads((trained / "summary.json").read_text())
    (trained / "summary.json").write_text(json.dumps({**summary, "training_key": "t-1"}))
    scored = _with_scores(eval_dir, tmp_path / "scored", 0.6, 0.3)
    m = json.loads((scored / "metrics.json").read_text())
    (scored / "metrics.json").write_text(json.dumps({**m, "evaluation_key": evaluation_key("t-1", EvalConfig())}))
    jobs = [(str(trained), str(scored), uri, "twice")] * 2
    barrier = SPAWN.Manager().Barrier(len(jobs))
    with SPAWN.Pool(len(jobs)) as pool:
        results = pool.starmap(_register, [(*j, barrier) for j in jobs])
    assert results == [("1", "champion")] * 2
    assert [r["version"] for r in catalogue.list_concepts(uri) if r["name"] == "twice"] == ["1"]
    plan = [{"images": "x", "token": "<cat>", "init_word": "cat", "name": "twice"}]
    report = batch_report(uri, "b-1", plan)["concepts"][0]
    assert (report["status"], report["version"]) in (("registered", "1"), ("unchanged", "1"))
    if report["status"] == "registered":  # why that alias, as the batch's table shows a candidate's
        assert report["gate"].startswith("the first champion"), report
    # a third run, evaluated otherwise (another result key), registers a version of its own
    m = json.loads((scored / "metrics.json").read_text())
    (scored / "metrics.json").write_text(json.dumps({**m, "evaluation_key": "another"}))
    third = registry.register(trained, scored, uri, name="twice")
    assert not third.unchanged and [r["version"] for r in catalogue.list_concepts(uri) if r["name"] == "twice"] == [
        "1", third.version
    ]  # fmt: skip


def test_registry_queries_read_every_page(mlflow_server):
    """More concepts (and versions) than one page holds: nothing is lost past the first page."""
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("paging")
    run = client.create_run(exp)
    for i in range(12):
        name = f"paged-{i:02d}"
        client.create_registered_model(name, tags={registry.CONCEPT_TAG: "true"})
        for _ in range(7 if i == 0 else 1):
            mv = client.create_model_version(name, f"runs:/{run.info.run_id}/concept", run_id=run.info.run_id)
            client.set_model_version_tag(name, mv.version, "oneword.batch_id", "paging")
    rows = [r for r in catalogue.list_concepts(mlflow_server, page_size=5) if r["name"].startswith("paged-")]
    assert len(rows) == 12 + 6
    assert [r["version"] for r in rows if r["name"] == "paged-00"] == [str(v) for v in range(1, 8)]
    for name in ("paged-01", "paged-02", "paged-03"):
        batch_records.record_failure(mlflow_server, name, "<x>", "paging", "train", "boom", "paging-exp")
    assert len(batch_records.batch_failures(mlflow_server, "paging", "paging-exp")) == 3
    # another process creates a concept between two pages: MLflow's page tokens are offsets, so the next page
    # starts one item early, and a listing would hold a concept twice (and prune count its versions twice)
    pages = []

    def searched_while_another_registers(**kwargs):
        page = client.search_registered_models(**kwargs)
        if not pages:
            client.create_registered_model("paged-00a", tags={registry.CONCEPT_TAG: "true"})
        pages.append([m.name for m in page])
        return page

    found = registry.every_page(searched_while_another_registers, 5, filter_string="name LIKE 'paged-%'")
    assert pages[1][0] == pages[0][-1]  # the shift the pages really had
    assert len({m.name for m in found}) == len(found)


def test_a_second_training_into_a_folder_being_trained_into_is_refused(cat_latents_dir, tiny_model_dir, tmp_path):
    """Two `oneword train -o` of one folder at once (a command run in two terminals) wrote their checkpoints among
    each other's: the second is refused while the first writes, and a first killed outright (kill -9) holds
    nothing, so its folder resumes."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from oneword.config import ConceptSpec, TrainConfig
    from oneword.errors import OnewordError
    from oneword.train import train

    out = tmp_path / "out"
    args = ["train", str(cat_latents_dir), "--token", "<twice>", "--init-word", "cat", "-o", str(out), "--base-model",
            str(tiny_model_dir), "--steps", "100000", "--checkpoint-every", "2", "--device", "cpu"]  # fmt: skip
    first = subprocess.Popen([str(Path(sys.executable).parent / "oneword"), *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    concept, config = ConceptSpec(token="<twice>", init_word="cat"), TrainConfig(steps=4, device="cpu")
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000002.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        with pytest.raises(OnewordError, match="is being written by another training now") as e:
            train(cat_latents_dir, out, concept, config, base_model=str(tiny_model_dir), resume=True, progress=False)
        assert str(out) in e.value.message and "choose another -o" in e.value.hint
        assert first.poll() is None  # the first goes on
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
    done = max(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))
    again = TrainConfig(steps=done + 2, device="cpu", checkpoint_every=2)
    result = train(cat_latents_dir, out, concept, again, base_model=str(tiny_model_dir), resume=True, progress=False)
    assert result.steps_run == 2 and (out / "learned_embeds.safetensors").exists()


_WRITER = """
import sys, time
from pathlib import Path
from oneword.storage import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "part.bin").write_bytes(b"x" * 1000)
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def test_what_a_writer_killed_outright_left_beside_its_output_is_cleared_by_the_next(tmp_path):
    """A step killed with SIGKILL (the OOM killer) while it wrote left its scratch folder (`.out.tmp-*`, photos or
    latents) beside the output for good; the next writer of that output removes it, but not the scratch folder
    of a writer still at work, and puts back an output set aside for a new one that never moved in."""
    import subprocess
    import sys

    from oneword.storage import atomic_dir

    final = tmp_path / "out"

    def writer():
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(final)], stdout=subprocess.PIPE, text=True)
        return proc, tmp_path / proc.stdout.readline().strip()

    killed, abandoned = writer()
    working, busy = writer()
    try:
        killed.kill()
        killed.wait(timeout=30)
        assert abandoned.is_dir() and busy.is_dir()
        with atomic_dir(final) as tmp:  # a writer makes its folder a moment before it holds it: young ones stay
            (tmp / "new.txt").write_text("new")
        assert abandoned.is_dir()
        for scratch in (abandoned, busy):  # as if made a while ago
            os.utime(scratch, (time.time() - 120, time.time() - 120))
        with atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("new")
        assert not abandoned.exists() and busy.is_dir()  # the killed one's goes, the working one's stays
        assert sorted(p.name for p in final.iterdir()) == ["new.txt"]  # the lock file is not part of the output
    finally:
        working.kill()
        working.wait(timeout=30)
    final.rename(tmp_path / ".out.old-abc123")  # killed after it set the old output aside, before the new moved in
    with pytest.raises(RuntimeError), atomic_dir(final):
        raise RuntimeError("this writer fails")
    assert (final / "new.txt").read_text() == "new"  # put back, and kept by a writer that failed
    # the second writer, killed too, left its scratch folder: cleared as well
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [".out.lock"]


def test_two_promotes_at_once_say_which_one_holds(tmp_path):
    """MLflow sets an alias unconditionally: two promotes at once both said they moved @champion, and the version
    that lost it kept a record of being promoted. Whichever holds says so; the other says it was overtaken, and
    leaves no record, or it held first, and the one that holds names it or the champion before both (a version
    that held the alias either way, never one whose promote said it failed)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_store(uri)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("promote-race")).info.run_id
    client.create_registered_model("race", tags={registry.CONCEPT_TAG: "true"})
    for v in (1, 2, 3):
        client.create_model_version("race", f"runs:/{run}/m{v}", run_id=run, tags={"oneword.token": "<r>", "gate": "d"})
    client.set_registered_model_alias("race", "champion", "3")
    for _ in range(3):  # the two may meet, or not: either way what they say is what holds
        client.set_registered_model_alias("race", "champion", "3")
        for v in ("1", "2"):
            client.delete_model_version_tag("race", v, catalogue.promoted_tag("champion"))
        barrier = SPAWN.Manager().Barrier(2)
        with SPAWN.Pool(2) as pool:
            said = pool.starmap(_promote, [("race/1", uri, barrier), ("race/2", uri, barrier)])
        holder = str(client.get_registered_model("race").aliases["champion"])
        assert holder in ("1", "2")
        for ref, answer in zip(("race/1", "race/2"), said, strict=True):
            version = ref[-1]
            recorded = catalogue.promoted_tag("champion") in client.get_model_version("race", version).tags
            if version == holder:
                assert isinstance(answer, dict) and recorded, said
            elif isinstance(answer, dict):  # it held first: the other replaced it, or the champion before both
                other = said[1 - ("race/1", "race/2").index(ref)]
                assert other["before"] in (version, "3") and recorded, said
            else:
                assert f"was moved to version {holder} by another promote" in answer and not recorded, said


def test_a_promote_that_ran_whole_inside_another_is_named_as_the_one_replaced(tmp_path, monkeypatch):
    """The meeting the test above may or may not see, made to happen: one promote reads @champion (3), another
    promotes version 1 whole, then the first sets the alias. The first said it replaced version 3, and its
    record said so; it replaced version 1."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_store(uri)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("promote-meet")).info.run_id
    client.create_registered_model("meet", tags={registry.CONCEPT_TAG: "true"})
    for v, token in ((1, "<one>"), (2, "<two>"), (3, "<three>")):
        client.create_model_version("meet", f"runs:/{run}/m{v}", run_id=run, tags={"oneword.token": token, "gate": "d"})
    client.set_registered_model_alias("meet", "champion", "3")
    setting = mlflow.MlflowClient.set_registered_model_alias
    inside = []

    def set_after_another(self, name, alias, version):
        if str(version) == "2" and not inside:  # between version 2's read of the alias and its set
            inside.append(catalogue.promote("meet/1", reason="first", tracking_uri=uri))
        return setting(self, name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", set_after_another)
    said = catalogue.promote("meet/2", reason="second", tracking_uri=uri)
    assert inside[0]["before"] == "3" and said["before"] == "1" and said["before_token"] == "<one>", (inside, said)
    record = client.get_model_version("meet", "2").tags[catalogue.promoted_tag("champion")]
    assert record.startswith("@champion by hand (was version 1) at ") and record.endswith(": second"), record
    assert str(client.get_registered_model("meet").aliases["champion"]) == "2"


def _run_missing_model(root: str, uri: str, images: str, who: str, barrier) -> str:
    import kfp.local  # noqa: F401  (warm, as a script or a scheduler that starts runs is)

    import oneword.pipelines.definitions  # noqa: F401
    from oneword.pipelines.local import run_textual_inversion

    tracking.ensure_store(uri)
    barrier.wait(timeout=120)
    try:
        run_textual_inversion(Path(root), uri, Path(root) / f"{who}.log", images=images, token=f"<{who}>",
                              init_word="cat", base_model=str(Path(root) / f"no-model-{who}"), steps=2)  # fmt: skip
    except OnewordError as e:
        return e.message
    return "returned"


@pytest.mark.slow
def test_two_local_runs_started_at_once_in_one_pipeline_root_each_report_their_own(tmp_path):
    """kfp.local names a run by the time it starts: two processes that start runs in one pipeline root at the
    same moment each took the first folder named after their start, which may be another's, and reported its
    failure (or its result) as their own. Each names its own missing model."""
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    who, photos = ("alpha", "beta", "gamma"), str(DREAMBENCH / "cat")
    barrier = SPAWN.Manager().Barrier(len(who))
    with SPAWN.Pool(len(who)) as pool:
        said = pool.starmap(_run_missing_model, [(str(tmp_path), uri, photos, w, barrier) for w in who])
    for w, message in zip(who, said, strict=True):
        assert f"no-model-{w}" in message, said
