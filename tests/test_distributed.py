"""Training over several processes (accelerate's launcher, gloo on CPU): the same vectors as one process, for
whole concepts per process and for one concept's batch split; checkpoints written once, resumed on another count;
a failure in a launched process reaches the caller with its message."""

import itertools
from pathlib import Path

import pytest
import torch

from oneword import checkpoints
from oneword.distributed import World
from oneword.embeddings import load as load_embedding
from oneword.errors import OnewordError
from oneword.inversion import ConceptSpec, TrainConfig
from oneword.train import train_group

SPECS = [ConceptSpec(token=f"<d{i}>", init_word=w) for i, w in enumerate(("cat", "dog", "clock"))]


def _vectors(folder: Path) -> torch.Tensor:
    return load_embedding(folder / "learned_embeds.safetensors").vectors


def test_shares_cover_the_batch_once():
    for n, size in [(8, 2), (4, 2), (3, 2), (1, 2), (16, 3)]:
        shares = [World(r, size).share(n) for r in range(size)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
        assert max(hi - lo for lo, hi in shares) - min(hi - lo for lo, hi in shares) <= 1


@pytest.mark.slow
def test_two_processes_train_a_group_as_one_does_and_one_resumes_it(tiny_model_dir, cat_latents_dir, tmp_path):
    """3 concepts x batch 2 = 6 samples over 2 processes: the first takes concept 0 and half of concept 1, the
    second the rest, so whole concepts (concept-parallel) and a split concept (data-parallel) are both here. With
    an L2 pull, the regulariser's share is checked too. After 4 steps the vectors are one process's at step 4;
    one process resumes the 2-process checkpoints to step 8 and ends where one process alone does."""
    members = [(f"c{i}", s, cat_latents_dir) for i, s in enumerate(SPECS)]
    cfg = TrainConfig(steps=8, batch_size=2, checkpoint_every=2, log_every=2, init_l2=0.1, device="cpu", gpus=1)
    one = train_group(members, tmp_path / "one", cfg, str(tiny_model_dir))
    half = cfg.model_copy(update={"steps": 4, "gpus": 2})
    two = train_group(members, tmp_path / "two", half, str(tiny_model_dir))
    assert [r["status"] for r in one] == [r["status"] for r in two] == ["trained"] * 3
    at_4 = checkpoints.load_checkpoint(checkpoints.list_checkpoints(tmp_path / "one" / "checkpoints")[1][1])
    for name, spec in zip(("c0", "c1", "c2"), SPECS):
        torch.testing.assert_close(_vectors(tmp_path / "two" / name), at_4["vectors"][spec.token], rtol=1e-4, atol=1e-6)
        assert '"processes": 2' in (tmp_path / "two" / name / "summary.json").read_text()
    # written once, by the main process: the checkpoints a single process writes
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "two" / "checkpoints")] == [2, 4]
    resumed = train_group(members, tmp_path / "two", cfg, str(tiny_model_dir))
    assert [r["status"] for r in resumed] == ["trained"] * 3
    for name in ("c0", "c1", "c2"):
        torch.testing.assert_close(_vectors(tmp_path / "two" / name), _vectors(tmp_path / "one" / name), rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "two" / "checkpoints")] == [2, 4, 6, 8]


def test_the_shares_losses_add_up_to_the_whole_batchs(tiny_model, cat_latents):
    """Each process's loss counts its samples and 1/N of the regulariser: over the processes, the sum is the
    single-process loss of every concept (so the summed gradients are the single-process gradients)."""
    from oneword.inversion import InversionTrainer

    cfg = TrainConfig(steps=1, batch_size=3, init_l2=0.5, init_cos=0.2, device="cpu")
    tr = InversionTrainer(tiny_model, [(s, cat_latents) for s in SPECS[:2]], cfg)
    with torch.no_grad():
        tr.concepts[1].param.add_(0.01)  # off the initializer, so the pulls are not zero
    z0, ids, _ = tr._batch(0)  # 6 rows: 3 per concept, so one process's share crosses the concepts' boundary
    noise, t = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 500, 900] * 2)
    whole = tr.concept_losses(z0, ids, noise, t)
    for size in (2, 4, 8):  # 8 > 6 rows: two processes get none
        parts = []
        for rank in range(size):
            tr.world = World(rank, size)
            parts.append(tr._share_losses(z0, ids, noise, t, None))
        torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_processes_draw_the_evaluations_images_of_one(evaluated_concept, cat_dataset, tiny_clip_dir, tmp_path):
    """Evaluation sampling split over 2 processes: the same images (each has its own seed), so the same scores,
    checkpoint choice and grid as one process; the main process alone writes the outputs."""
    import json

    import numpy as np
    from PIL import Image

    from oneword.evaluation.evaluate import EvalConfig, evaluate

    train_dir, one_dir = evaluated_concept
    cfg = EvalConfig(n_images=2, steps=2, checkpoint_budget=1, clip_model=str(tiny_clip_dir), gpus=2)
    two = evaluate(train_dir, cat_dataset, tmp_path / "eval", cfg)
    one = json.loads((one_dir / "metrics.json").read_text())
    assert two["processes"] == 2 and two["images_generated"] == one["images_generated"]
    assert two["step"] == one["step"]
    for key in ("reconstruction", "editability"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    assert two["baselines"]["prompt_only"] == pytest.approx(one["baselines"]["prompt_only"], abs=1e-4)
    a, b = (np.asarray(Image.open(d / "grid.png"), dtype=float) for d in (one_dir, tmp_path / "eval"))
    assert a.shape == b.shape and np.abs(a - b).mean() < 0.5  # 8-bit pixels: at most rounding apart


@pytest.mark.slow
def test_a_process_that_dies_takes_the_step_down_and_the_rerun_resumes(tiny_model_dir, cat_latents_dir, tmp_path):
    """One concept's batch split over 2 processes; kill -9 of one: the launch ends (no process left waiting on the
    dead one), the command fails with a message, and a rerun on one process resumes from the checkpoints the main
    process wrote."""
    import re
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "oneword"), "train", str(cat_latents_dir), "--token", "<d0>",
           "--init-word", "cat", "-o", str(out), "--base-model", str(tiny_model_dir), "--steps", "60",
           "--checkpoint-every", "10", "--batch-size", "4", "--device", "cpu", "--resume"]  # fmt: skip
    proc = subprocess.Popen([*cmd, "--gpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-000010.pt").exists():  # the first: most of the run still ahead
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)

    def rank(p: psutil.Process) -> str | None:
        try:
            return p.environ().get("LOCAL_RANK")
        except psutil.NoSuchProcess:  # a helper process that ended between the listing and the look
            return None

    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if rank(p) == "1"]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    log, _ = proc.communicate(timeout=90)
    done = [s for s, _ in checkpoints.list_checkpoints(out / "checkpoints")]
    assert proc.returncode != 0 and max(done) < 60, done
    message = " ".join(log.split())  # as the CLI printed it, wrapped
    assert "over 2 processes failed" in message and "resumes from the last checkpoint" in message, log[-2000:]
    rerun = subprocess.run([*cmd, "--gpus", "1"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    first = re.search(r"\| *(\d+)/60", rerun.stderr)  # the progress bar starts where the checkpoints end
    assert first and int(first.group(1)) == max(done), rerun.stderr[:500]
    assert (out / "learned_embeds.safetensors").exists()


def test_a_launched_processs_error_reaches_the_caller(tmp_path):
    """The main process's bad-input error comes back as itself (message and hint); anything else, or a process
    that died, becomes an error naming the exit status and what to do."""
    import pickle

    from oneword.distributed import _outcome

    result = tmp_path / "result.pkl"
    result.write_bytes(pickle.dumps((False, OnewordError("checkpoint x was written for concepts [a]", hint="h"))))
    with pytest.raises(OnewordError) as e:
        _outcome("m:f", 2, result, 1)
    assert (e.value.message, e.value.hint) == ("checkpoint x was written for concepts [a]", "h")
    result.write_bytes(pickle.dumps((False, RuntimeError("Connection reset by peer"))))
    with pytest.raises(OnewordError, match=r"over 2 processes failed \(exit status 1\).*Connection reset") as e:
        _outcome("m:f", 2, result, 1)
    assert "resumes from the last checkpoint" in e.value.hint
    with pytest.raises(OnewordError, match=r"exit status -9"):  # killed before writing anything
        _outcome("m:f", 2, tmp_path / "none.pkl", -9)
    result.write_bytes(pickle.dumps((True, {"steps": 4})))
    assert _outcome("m:f", 2, result, 0) == {"steps": 4}
    with pytest.raises(OnewordError) as e:  # the main process finished, another one failed
        _outcome("m:f", 2, result, 1)
    assert "exit status 1" in e.value.message and "the main process" not in e.value.message


def _collective_timeout() -> float:
    from oneword.distributed import current

    current()
    group = torch.distributed.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def test_the_processes_wait_for_a_checkpoint_stored_on_a_silent_store_as_long_as_its_save_may_take():
    """The others wait at a collective while the main process stores a checkpoint: they must outwait its attempts
    on a store that does not answer (each bounded by the client's timeouts), or they go down first."""
    from oneword import checkpoints, storage
    from oneword.distributed import COLLECTIVE_TIMEOUT, launch

    # per attempt an upload and a size check, each up to 3 connects and 2 reads (urllib3's retries); backoffs
    attempt = 2 * (3 * storage.CONNECT_TIMEOUT_S + 2 * storage.READ_TIMEOUT_S)
    backoffs = sum(checkpoints.UPLOAD_BACKOFF_S * 2**i for i in range(checkpoints.UPLOAD_ATTEMPTS - 1))
    assert COLLECTIVE_TIMEOUT.total_seconds() > checkpoints.UPLOAD_ATTEMPTS * attempt + backoffs
    assert launch("tests.test_distributed:_collective_timeout", 2) == COLLECTIVE_TIMEOUT.total_seconds()


def _times_out(url: str):
    raise TimeoutError(f"reading {url} timed out")


def test_an_error_a_retry_may_cure_is_still_one_after_crossing_processes(tmp_path):
    """A launch's pickles keep no cause: a timeout in the main process must still read as transient, so that a
    batch's train task raises it for its retries instead of recording it as every concept's failure."""
    import pickle

    from oneword import outcome
    from oneword.distributed import _main, _outcome

    call, result = tmp_path / "call.pkl", tmp_path / "result.pkl"
    call.write_bytes(pickle.dumps(("tests.test_distributed:_times_out", {"url": "s3://b/k"})))
    with pytest.raises(TimeoutError):
        _main(str(call), str(result))
    with pytest.raises(OnewordError) as e:
        _outcome("m:f", 2, result, 1)
    assert outcome.transient(e.value) and "TimeoutError: reading s3://b/k timed out" in e.value.message


def test_what_cannot_cross_processes_keeps_one_or_is_refused():
    """A loaded model or callbacks: the default (every visible GPU) keeps one process; more is refused."""
    from oneword.distributed import processes

    assert processes(0, "cpu", "callbacks") == 1 and processes(1, "cpu", "a loaded model") == 1
    assert processes(3, "cpu") == 3
    with pytest.raises(OnewordError, match="a loaded model was given") as e:
        processes(2, "cpu", "a loaded model")
    assert "gpus=1" in e.value.hint


def test_only_the_writing_process_loads_the_vae_for_live_pictures(monkeypatch):
    """Live sample pictures are drawn by the process that writes; the others need no VAE in memory."""
    from oneword import distributed
    from oneword.live import LiveTracking
    from oneword.train import _samples

    tracking, config = LiveTracking(tracking_uri="file:///nowhere"), TrainConfig(sample_every=50)
    assert _samples(tracking, config) and not _samples(None, config)  # one process
    for rank, draws in ((0, True), (1, False)):
        monkeypatch.setattr(distributed, "current", lambda rank=rank: World(rank=rank, size=2))
        assert _samples(tracking, config) is draws


@pytest.mark.slow
def test_two_processes_end_early_at_the_step_one_process_does(tiny_model_dir, cat_latents_dir, tmp_path):
    """Early end is decided by each process from its own copy of the vectors: the copies are equal, so every
    process stops at the same step (one stopping alone would leave the others waiting in the next all-reduce)."""
    import json

    members = [(f"c{i}", s, cat_latents_dir) for i, s in enumerate(SPECS[:2])]
    # a threshold every movement passes: the run ends at the first check that has a whole window behind it
    cfg = TrainConfig(steps=12, batch_size=2, log_every=2, early_end=10.0, early_end_window=4, device="cpu", gpus=1)
    train_group(members, tmp_path / "one", cfg, str(tiny_model_dir))
    two = train_group(members, tmp_path / "two", cfg.model_copy(update={"gpus": 2}), str(tiny_model_dir))
    assert [r["status"] for r in two] == ["trained"] * 2
    for name in ("c0", "c1"):
        one_s, two_s = (json.loads((tmp_path / d / name / "summary.json").read_text()) for d in ("one", "two"))
        assert one_s["ended_early_at"] == two_s["ended_early_at"] == 4 and two_s["processes"] == 2
        torch.testing.assert_close(_vectors(tmp_path / "two" / name), _vectors(tmp_path / "one" / name), rtol=1e-4,
                                   atol=1e-6)  # fmt: skip


@pytest.mark.slow
def test_two_processes_stop_a_diverging_concept_as_one_process_does(tiny_model_dir, cat_latents_dir, tmp_path):
    """The second concept's latents are finite but so large that its loss overflows from the first step: it
    lies wholly on the second process, yet both processes stop it at the same report (its loss is summed over
    them first) and train the first concept on, as one process does."""
    from oneword.latents import LatentSet

    huge = LatentSet.load(cat_latents_dir)
    huge.mean = huge.mean.sign() * 3e38
    huge.save(tmp_path / "huge")
    members = [("c0", SPECS[0], cat_latents_dir), ("c1", SPECS[1], tmp_path / "huge")]
    cfg = TrainConfig(steps=6, batch_size=2, log_every=2, device="cpu", gpus=1)
    one = train_group(members, tmp_path / "one", cfg, str(tiny_model_dir))
    two = train_group(members, tmp_path / "two", cfg.model_copy(update={"gpus": 2}), str(tiny_model_dir))
    assert [r["status"] for r in one] == [r["status"] for r in two] == ["trained", "failed"]
    assert "became nan between steps 0 and 2" in two[1]["error"] and two[1]["error"] == one[1]["error"]
    torch.testing.assert_close(_vectors(tmp_path / "two" / "c0"), _vectors(tmp_path / "one" / "c0"), rtol=1e-4,
                               atol=1e-6)  # fmt: skip


def _note_pid_and_wait(folder: str) -> None:
    import os
    import time

    (Path(folder) / f"{os.getpid()}.pid").write_text("")
    time.sleep(120)


def test_a_sigterm_to_the_command_alone_stops_its_launched_processes(tmp_path):
    """`timeout` or a scheduler signals `oneword train --gpus 2` alone: it died, and its two processes trained
    on, orphaned, holding the GPUs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from oneword.distributed import launch\n"
            f"launch('tests.test_distributed:_note_pid_and_wait', 2, folder={str(tmp_path)!r})")  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2:  # both processes are up
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)], "a worker outlived it"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"
