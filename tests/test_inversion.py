from pathlib import Path

import pytest
import torch

from oneword import checkpoints
from oneword.errors import NonFiniteLossError, OnewordError
from oneword.inversion import ConceptSpec, InversionTrainer, TrainConfig
from oneword.models import load_base_model

CAT = ConceptSpec(token="<cat-x>", init_word="cat")


def _trainer(model, latents, concept=CAT, **cfg):
    cfg.setdefault("steps", 10)
    cfg.setdefault("checkpoint_every", 0)
    return InversionTrainer(model, [(concept, latents)], TrainConfig(**cfg))


def test_only_the_new_rows_change(tiny_model, cat_latents):
    table = tiny_model.text_encoder.get_input_embeddings().weight.detach().clone()
    te_state = {k: v.clone() for k, v in tiny_model.text_encoder.state_dict().items()}
    unet_state = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    tr = _trainer(tiny_model, cat_latents, steps=15)
    init = tr.concepts[0].param.detach().clone()
    tr.run(progress=False)
    assert torch.equal(tr.splices[0].base.weight, table)  # every one of the 49,408 rows, bit for bit
    assert not torch.equal(tr.concepts[0].param, init)  # the new row did learn
    for k, v in tiny_model.unet.state_dict().items():
        assert torch.equal(v, unet_state[k]), k
    for k, v in tiny_model.text_encoder.state_dict().items():
        key = k.replace("token_embedding.base.", "token_embedding.")
        if "token_embedding.vectors" not in k:
            assert torch.equal(v, te_state[key]), k
    assert tr.optimizer.param_groups[0]["params"] == [tr.concepts[0].param]  # one small parameter


def test_loss_falls_when_overfitting_one_image(tiny_model, cat_latents):
    tr = _trainer(tiny_model, cat_latents, learning_rate=0.05, scale_lr=False, weight_decay=0)
    z0 = cat_latents.mean[0, 0][None] * cat_latents.scaling_factor
    ids = tr.concepts[0].prompt_ids[1][:1]
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(z0.shape, generator=g), torch.tensor([500])
    losses = []
    for _ in range(60):
        loss = tr.loss(z0, ids, noise, t)
        loss.backward()
        tr.optimizer.step()
        tr.optimizer.zero_grad()
        losses.append(loss.item())
    # Fixed image, noise and timestep: the only thing that moves is the new vector. A random tiny model listens
    # to its text only a little, so the fall is small, but it is steady and well above float noise.
    assert losses[-1] < losses[0] - 0.005, losses[::10]
    assert all(b <= a + 1e-6 for a, b in zip(losses[::10], losses[10::10])), losses[::10]


def test_resume_is_bit_for_bit(tiny_model_dir, cat_latents, tmp_path):
    whole = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=20, checkpoint_every=10)
    whole.run(tmp_path / "a", progress=False)
    half = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=10, checkpoint_every=10)
    half.run(tmp_path / "b", progress=False)
    rest = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=20, checkpoint_every=10)
    rest.run(tmp_path / "b", resume=True, progress=False)
    assert rest.step == 20
    assert torch.equal(whole.concepts[0].param, rest.concepts[0].param)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "b")] == [10, 20]
    assert [p["step"] for p in rest.curve] == [p["step"] for p in whole.curve]


def test_a_resume_trains_on_at_the_learning_rate_asked_for(tiny_model_dir, cat_latents, tmp_path):
    first = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=10, checkpoint_every=10)
    first.run(tmp_path, progress=False)
    slower = _trainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)),
        cat_latents,
        steps=20,
        checkpoint_every=10,
        learning_rate=1e-4,
    )
    asked = [g["lr"] for g in slower.optimizer.param_groups]
    assert asked != [g["lr"] for g in first.optimizer.param_groups]
    slower.run(tmp_path, resume=True, progress=False)
    assert slower.step == 20 and [g["lr"] for g in slower.optimizer.param_groups] == asked
    assert slower.optimizer.state  # the checkpoint's moments went on


def test_seeded_runs_reproduce_and_seeds_differ(tiny_model_dir, cat_latents):
    runs = []
    for seed in (3, 3, 4):
        tr = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, seed=seed)
        tr.run(progress=False)
        runs.append(tr.concepts[0].param.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_resume_refuses_another_concept(tiny_model_dir, cat_latents, tmp_path):
    _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, checkpoint_every=5).run(
        tmp_path, progress=False
    )
    other = _trainer(
        load_base_model(str(tiny_model_dir), parts=("unet",)),
        cat_latents,
        concept=ConceptSpec(token="<dog-x>", init_word="dog"),
    )
    with pytest.raises(OnewordError, match="same token"):
        other.run(tmp_path, resume=True, progress=False)


def test_resume_refuses_the_same_word_learned_from_other_photos(tiny_model_dir, cat_latents, tmp_path):
    """`train --resume` into the folder of another training of the same token (its photos changed since, or
    another concept's) went on from its checkpoints: evaluation then chose among vectors of both."""
    from dataclasses import replace

    _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, checkpoint_every=5).run(
        tmp_path, progress=False
    )
    edited = replace(cat_latents, image_sha256=["f" * 64, *cat_latents.image_sha256[1:]])  # one photo changed
    other = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), edited, steps=15)
    with pytest.raises(OnewordError, match=r"learned <cat-x> from other photos: 1 of this run's \d+ are not among"):
        other.run(tmp_path, resume=True, progress=False)
    same = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=15)
    assert same.run(tmp_path, resume=True, progress=False).steps == 15  # its own photos go on


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model, cat_latents, tmp_path):
    tr = _trainer(tiny_model, cat_latents, steps=30, checkpoint_every=10, log_every=5)
    real_loss, calls = tr.concept_losses, []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) > 12 else loss

    tr.concept_losses = poisoned
    with pytest.raises(NonFiniteLossError) as e:
        tr.run(tmp_path, progress=False)
    assert "step-000010.pt" in str(e.value) and "between steps 10 and 15" in str(e.value)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path)] == [10]
    good = checkpoints.load_checkpoint(tmp_path / "step-000010.pt")
    assert torch.isfinite(good["vectors"][CAT.token]).all()


def test_v_prediction_model_trains(tiny_v_model_dir, cat_dataset, tmp_path):
    from oneword.latents import cache_latents

    model = load_base_model(str(tiny_v_model_dir))
    lat = cache_latents(cat_dataset, model, tmp_path / "lat")
    tr = _trainer(model, lat, steps=5)
    assert tr.prediction_type == "v_prediction"
    tr.run(progress=False)
    assert torch.isfinite(tr.concepts[0].param).all() and tr.concepts[0].param.shape == (1, 48)


def test_several_concepts_in_one_batch(tiny_model, cat_latents):
    dog = ConceptSpec(token="<dog-x>", init_word="dog", n_vectors=2)
    tr = InversionTrainer(
        tiny_model, [(CAT, cat_latents), (dog, cat_latents)], TrainConfig(steps=6, batch_size=3, checkpoint_every=0)
    )
    z, ids, time_ids = tr._batch(0)
    assert z.shape[0] == 6 and ids.shape == (6, 1, 77) and time_ids.shape == (6, 6)  # one text encoder
    ids = ids[:, 0]
    cat_ids, dog_ids = set(tr.concepts[0].token_ids), set(tr.concepts[1].token_ids)
    assert all(set(row.tolist()) & cat_ids and not set(row.tolist()) & dog_ids for row in ids[:3])
    assert all(set(row.tolist()) >= dog_ids and not set(row.tolist()) & cat_ids for row in ids[3:])
    before = [c.param.detach().clone() for c in tr.concepts]
    tr.run(progress=False)
    for b, c in zip(before, tr.concepts):
        assert not torch.equal(b, c.param)
    embs = tr.embeddings()
    assert [e.token for e in embs] == ["<cat-x>", "<dog-x>"] and embs[1].vectors.shape == (2, 32)


def test_progressive_vectors(tiny_model, cat_latents):
    concept = ConceptSpec(token="<p-x>", init_word="cat", n_vectors=3)
    tr = _trainer(tiny_model, cat_latents, concept=concept, progressive_every=4, steps=12)
    second = tr.concepts[0].token_ids[1]
    assert second not in tr._batch(3)[1]
    assert second in tr._batch(4)[1] and tr.concepts[0].token_ids[2] not in tr._batch(7)[1]
    for step in range(4):
        tr.train_step(step)
    tr._activate_vectors(4)
    assert torch.equal(tr.concepts[0].param[1], tr.concepts[0].init[1])  # joins from the initializer
    for step in range(4, 12):
        tr.train_step(step)
    assert not torch.equal(tr.concepts[0].param[1], tr.concepts[0].init[1])


def test_l2_pull_keeps_vectors_near_the_initializer(tiny_model_dir, cat_latents):
    dist = {}
    for lam in (0.0, 50.0):
        tr = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, init_l2=lam, steps=30)
        tr.run(progress=False)
        c = tr.concepts[0]
        dist[lam] = (c.param - c.init).norm().item()
    assert dist[50.0] < 0.5 * dist[0.0]


def test_the_l2_pulls_weight_follows_its_schedule(tiny_model, cat_latents):
    """constant holds init_l2; decay falls from it to 0 over the run, rise climbs from 0 to it; and the loss
    carries the weight of the step being trained (a decayed pull adds nothing at the last step)."""
    tr = _trainer(tiny_model, cat_latents, init_l2=2.0, steps=11)
    weights = {}
    for schedule in ("constant", "decay", "rise"):
        tr.config = tr.config.model_copy(update={"init_l2_schedule": schedule})
        weights[schedule] = [tr.init_l2_weight(s) for s in (0, 5, 10)]
    assert weights == {"constant": [2.0, 2.0, 2.0], "decay": [2.0, 1.0, 0.0], "rise": [0.0, 1.0, 2.0]}
    with torch.no_grad():
        tr.concepts[0].param.add_(0.1)  # away from the initializer: the pull is not zero
    z0, ids, _ = tr._batch(0)
    noise, t = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)), torch.full((z0.shape[0],), 300)
    losses = {}
    for schedule, step in (("constant", 10), ("decay", 10), ("decay", 5), ("rise", 0)):
        tr.config, tr._step_now = tr.config.model_copy(update={"init_l2_schedule": schedule}), step
        losses[schedule, step] = tr.concept_losses(z0, ids, noise, t).item()
    bare = losses["rise", 0]  # weight 0: the diffusion loss alone
    assert losses["decay", 10] == pytest.approx(bare)
    assert losses["decay", 5] - bare == pytest.approx((losses["constant", 10] - bare) / 2, rel=1e-4)


def test_lr_is_scaled_by_batch_size():
    from oneword.profiles import PROFILES

    sd1 = PROFILES["sd1"]  # the paper's recipe: base LR 5e-3
    assert TrainConfig(batch_size=4).resolved(sd1).lr == pytest.approx(0.02)
    assert TrainConfig(batch_size=4, scale_lr=False).resolved(sd1).lr == pytest.approx(0.005)
    with pytest.raises(ValueError, match="profile"):
        TrainConfig().lr  # noqa: B018  unset until the model's profile says


def test_token_already_in_vocabulary(tiny_model, cat_latents):
    with pytest.raises(OnewordError, match="already in the vocabulary"):
        _trainer(tiny_model, cat_latents, concept=ConceptSpec(token="cat", init_word="cat"))


def test_token_with_space(tiny_model, cat_latents):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'my cat' is not one word"):  # the spec refuses it
        ConceptSpec(token="my cat", init_word="cat")
    with pytest.raises(OnewordError, match="no spaces"):  # and the trainer too, given one built unchecked
        _trainer(tiny_model, cat_latents, concept=ConceptSpec.model_construct(token="my cat", init_word="cat"))


def test_multi_token_initializer_names_pieces_and_suggests(tiny_model, cat_latents):
    with pytest.raises(OnewordError) as e:
        _trainer(tiny_model, cat_latents, concept=ConceptSpec(token="<x>", init_word="xylophonist"))
    msg, pieces = str(e.value), tiny_model.tokenizer.tokenize("xylophonist")
    assert "'xylophonist' splits into" in msg and "try one of: object, thing" in e.value.hint
    assert not any(p.replace("</w>", "") in e.value.hint.split(": ")[1].split(", ") for p in pieces)  # no word's piece
    with pytest.raises(OnewordError, match="splits into 2 tokens") as e:
        _trainer(tiny_model, cat_latents, concept=ConceptSpec(token="<x>", init_word="red car"))
    assert e.value.hint.startswith("try one of: red, car, object")


def test_checkpoints_on_s3_and_resume_from_them(tiny_model_dir, cat_latents, s3_bucket):
    where = f"s3://{s3_bucket}/runs/cat"
    first = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=6, checkpoint_every=3)
    first.run(where, progress=False)
    assert [s for s, _ in checkpoints.list_checkpoints(where)] == [3, 6]
    whole = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=9)
    whole.run(progress=False)
    rest = _trainer(load_base_model(str(tiny_model_dir), parts=("unet",)), cat_latents, steps=9, checkpoint_every=3)
    rest.run(where, resume=True, progress=False)
    assert torch.equal(whole.concepts[0].param, rest.concepts[0].param)


def test_metrics_callback_and_curve(tiny_model, cat_latents):
    seen = []
    tr = _trainer(tiny_model, cat_latents, steps=12, log_every=4)
    tr.run(callbacks=[lambda step, m: seen.append((step, sorted(m)))], progress=False)
    assert seen == [(4, ["embedding_norm", "loss"]), (8, ["embedding_norm", "loss"]), (12, ["embedding_norm", "loss"])]
    assert [p["step"] for p in tr.curve] == [4, 8, 12] and all(p["loss"] > 0 for p in tr.curve)


def _steps(trainer, n):
    losses = torch.stack([trainer.train_step(s) for s in range(n)])
    return losses, [p.detach().clone() for c in trainer.concepts for p in c.params]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_compile_max_is_one_graph_with_the_eager_numbers(family, tiny_model_dir, cat_latents, monkeypatch, tmp_path):
    """`compile max` captures text encoders, UNet and loss as one graph with no break (a host sync or a Python
    branch on a tensor would break it, and CUDA graphs need none), and trains as the eager path does: same losses,
    same vectors, two concepts and the L2 pull included. aot_eager: the same capture as inductor, without its
    minutes of C++ code generation on a CPU."""
    from oneword import inversion
    from oneword.random_models import build_tiny_sdxl_model

    monkeypatch.setattr(inversion, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    model_dir = str(build_tiny_sdxl_model(tmp_path / "xl")) if family == "sdxl" else str(tiny_model_dir)
    latents = cat_latents
    if family == "sdxl":  # the cat's latents at the SDXL model's size (4x4): random ones of that shape
        from oneword.bench import synthetic_latents

        latents = synthetic_latents(4, 4)
    runs = {}
    for mode in ("off", "max"):
        dog = ConceptSpec(token="<dog-x>", init_word="dog")
        cfg = TrainConfig(steps=3, batch_size=2, checkpoint_every=0, init_l2=0.1, compile=mode)
        runs[mode] = _steps(InversionTrainer(load_base_model(model_dir), [(CAT, latents), (dog, latents)], cfg), 3)
    (eager_losses, eager_vectors), (max_losses, max_vectors) = runs["off"], runs["max"]
    assert torch.isfinite(eager_losses).all() and len(eager_vectors) == (4 if family == "sdxl" else 2)
    torch.testing.assert_close(max_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(max_vectors, eager_vectors):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_setting_reads_the_old_flag():
    assert TrainConfig(compile=True).compile == "default" and TrainConfig(compile=False).compile == "off"
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="fastest")


def test_early_end_stops_a_settled_run_and_a_rerun_stays_stopped(tiny_model_dir, cat_latents, tmp_path):
    """With early_end on, the run ends once the vectors have stopped moving (here: a learning rate so small that
    they hardly move), with a checkpoint at that step; resuming from it trains nothing more. A run whose vectors
    still move goes to the end."""
    settled = dict(steps=200, log_every=10, early_end=0.01, early_end_window=40, scale_lr=False, weight_decay=0)
    tr = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, learning_rate=1e-6, **settled)
    r = tr.run(checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert r.ended_early_at == 40 and r.steps == 40 and r.steps_run == 40  # the first check with a full window
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "ckpt")] == [40]
    again = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, learning_rate=1e-6, **settled)
    r2 = again.run(checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)
    assert (r2.steps_run, r2.ended_early_at) == (0, 40)
    torch.testing.assert_close(r2.embeddings[0].vectors, r.embeddings[0].vectors)

    moving = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, learning_rate=0.05, **{**settled, "steps": 60})
    r3 = moving.run(progress=False)
    assert r3.ended_early_at is None and r3.steps == 60


def test_checkpoint_storage_that_is_not_configured_is_an_error_not_a_fresh_start(s3_bucket, monkeypatch, tmp_path):
    import errno

    from oneword import storage

    assert checkpoints.list_checkpoints("s3://no-such-bucket-yet/ckpt") == []  # nothing stored yet: step 0
    for var in storage.ENDPOINT_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(OnewordError, match="S3_ENDPOINT_URL"):
        checkpoints.list_checkpoints(f"s3://{s3_bucket}/ckpt")
    with pytest.raises(OnewordError, match="S3_ENDPOINT_URL"):  # said at once: no retries, no backoff
        checkpoints.save_checkpoint(f"s3://{s3_bucket}/ckpt", 10, {"step": 10}, backoff=3600)

    def disk_full(state, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OnewordError, match=r"could not write checkpoint .*No space left"):
        checkpoints.save_checkpoint(tmp_path, 10, {"step": 10})
    assert list(tmp_path.iterdir()) == []  # no part file left behind


_FULL_DISK = """
import resource, signal, sys, torch
from oneword import checkpoints
from oneword.errors import OnewordError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as one on a full disk does
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
try:
    checkpoints.save_checkpoint(sys.argv[1], 10, {"step": 10, "table": torch.zeros(100000)})
except OnewordError as e:
    print(e.message)
"""


def test_a_checkpoint_the_disk_cannot_hold_is_said_and_leaves_no_part_file(tmp_path):
    """torch's writer says a write cut short as a RuntimeError ("unexpected pos"), not an OSError: training
    stopped with a traceback, and the part file stayed on the full disk."""
    import subprocess
    import sys

    said = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert said.returncode == 0 and f"could not write checkpoint {tmp_path}" in said.stdout, said.stdout + said.stderr
    assert "the write stopped short" in said.stdout and "MiB free there" in said.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_store_that_refuses_a_checkpoint_is_not_asked_again(s3_server, s3_bucket, monkeypatch):
    import urllib.request

    from oneword import storage

    def enforce_auth(count: str) -> None:  # the moto server's own switch: check every request's keys from now on
        url, headers = f"{s3_server['S3_ENDPOINT_URL']}/moto-api/reset-auth", {"Content-Type": "text/plain"}
        req = urllib.request.Request(url, data=count.encode(), headers=headers)
        urllib.request.urlopen(req, timeout=10).read()

    real, calls = storage.upload_file, []
    monkeypatch.setattr(storage, "upload_file", lambda *a: calls.append(a) or real(*a))
    enforce_auth("0")
    try:  # keys the store does not know: a 403 that no retry cures
        with pytest.raises(OnewordError, match=r"the store refused it.*AccessDenied"):
            checkpoints.save_checkpoint(f"s3://{s3_bucket}/ckpt", 10, {"step": 10}, backoff=0)
    finally:
        enforce_auth("inf")
    assert len(calls) == 1
    assert storage.refused(ValueError("invalid bucket name ab")) and not storage.refused(ConnectionError("reset"))


def test_part_files_of_killed_checkpoint_writers_are_cleared(tmp_path):
    import os
    import time

    stale, fresh = tmp_path / ".step-000010.pt.4242.part", tmp_path / ".step-000020.pt.4343.part"
    for part in (stale, fresh):
        part.write_bytes(b"half")
    old = time.time() - checkpoints.STALE_PART_S - 60
    os.utime(stale, (old, old))
    checkpoints.save_checkpoint(tmp_path, 30, {"step": 30})
    assert not stale.exists() and fresh.exists()  # a writer that may still be at work keeps its part file
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path)] == [30]
    from oneword import storage

    # writers in two pods on a shared volume often have one process id: their part files must still differ
    a, b = storage.part_path(tmp_path / "step-000040.pt"), storage.part_path(tmp_path / "step-000040.pt")
    assert a != b and a.name.startswith(".step-000040.pt.") and a.name.endswith(".part")


def test_a_progressive_vector_joins_with_fresh_optimiser_moments(tiny_model, cat_latents):
    spec = ConceptSpec(token="<cat-prog>", init_word="cat", n_vectors=2)
    tr = _trainer(tiny_model, cat_latents, concept=spec, steps=8, progressive_every=4, init_l2=0.5)
    for s in range(4):
        tr.train_step(s)
    param = tr.concepts[0].param
    state = tr.optimizer.state[param]
    assert state["exp_avg"][1].abs().sum() > 0  # the idle row's L2 pull (weight decay moved it) built momentum
    tr._activate_vectors(4)
    assert torch.equal(param[1], tr.concepts[0].inits[0][1])
    assert not state["exp_avg"][1].any() and not state["exp_avg_sq"][1].any()
    assert state["exp_avg"][0].any()  # the row that was training keeps its moments


def test_a_stopped_concept_does_not_move(tiny_model, cat_latents):
    specs = [ConceptSpec(token="<stop-a>", init_word="cat"), ConceptSpec(token="<stop-b>", init_word="dog")]
    tr = InversionTrainer(tiny_model, [(s, cat_latents) for s in specs], TrainConfig(steps=10))
    for s in range(3):
        tr.train_step(s)
    tr.concepts[0].failed = "its loss became nan"
    stopped, going = (c.param.detach().clone() for c in tr.concepts)
    for s in range(3, 6):
        tr.train_step(s)
    assert torch.equal(tr.concepts[0].param, stopped) and not torch.equal(tr.concepts[1].param, going)


def test_early_end_waits_for_the_last_progressive_vector_to_join_and_train(tiny_model, cat_latents):
    """Rows not yet in the prompts barely move: before, a loose early_end ended the run at its first check, with the
    second vector never trained (what check_progressive refuses at the end of a run)."""
    two = ConceptSpec(token="<p2>", init_word="cat", n_vectors=2)
    tr = _trainer(tiny_model, cat_latents, two, steps=60, progressive_every=30, log_every=2, early_end=10.0,
                  early_end_window=4)  # fmt: skip
    r = tr.run(progress=False)
    assert r.ended_early_at is not None and r.ended_early_at >= 30 + 4


def test_a_checkpoint_is_resumed_only_on_the_progressive_schedule_it_was_written_with(tiny_model_dir, cat_latents,
                                                                                      tmp_path):  # fmt: skip
    two = ConceptSpec(token="<p3>", init_word="cat", n_vectors=2)
    _trainer(load_base_model(str(tiny_model_dir)), cat_latents, two, steps=6, checkpoint_every=3).run(
        checkpoint_dir=tmp_path, progress=False
    )
    later = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, two, steps=12, progressive_every=4)
    with pytest.raises(OnewordError, match="progressive_every 0, this run with 4"):
        later.run(checkpoint_dir=tmp_path, resume=True, progress=False)


def test_a_run_that_ended_early_trains_on_when_resumed_with_early_end_off(tiny_model_dir, cat_latents, tmp_path):
    settled = dict(steps=80, log_every=10, early_end=0.01, early_end_window=40, scale_lr=False, weight_decay=0)
    first = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, learning_rate=1e-6, **settled)
    assert first.run(checkpoint_dir=tmp_path, progress=False).ended_early_at == 40
    on = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, learning_rate=1e-6, **{**settled, "early_end": 0})
    r = on.run(checkpoint_dir=tmp_path, resume=True, progress=False)
    assert (r.ended_early_at, r.steps, r.steps_run) == (None, 80, 40)


def test_a_checkpoint_resumes_only_on_the_model_and_device_it_was_written_on(tiny_model_dir, cat_latents, tmp_path):
    """The fingerprint covers the text side, not the UNet's weights: a fine-tune that kept the text encoder shares
    it. The model's reference is checked too; and a random state is its device's."""
    import shutil

    tr = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, steps=2)
    tr.run(progress=False)
    state = tr.state_dict()
    other = tmp_path / "unet-only-finetune"
    shutil.copytree(tiny_model_dir, other)
    elsewhere = _trainer(load_base_model(str(other)), cat_latents, steps=4)
    assert elsewhere.model.fingerprint == tr.model.fingerprint  # what the fingerprint alone could not tell apart
    with pytest.raises(OnewordError, match=r"trained on base model .* this run loads .*unet-only-finetune"):
        elsewhere.load_state_dict(state)
    same = _trainer(load_base_model(str(tiny_model_dir)), cat_latents, steps=4)
    with pytest.raises(OnewordError, match="was trained on cuda, this run is on cpu"):
        same.load_state_dict({**state, "device_type": "cuda"})
    same.load_state_dict(state)
    assert same.step == 2


def test_a_training_never_replaces_another_concepts_files(cat_latents_dir, tmp_path):
    """Training writes into its folder as it goes: another concept's training there, or a user's file of a name it
    writes, is refused before any work; an earlier training of the same concept is replaced, photos and all."""
    import shutil

    from oneword import embeddings as emb_io
    from oneword.train import train

    out = tmp_path / "shared"
    settings = TrainConfig(steps=2)

    def train_in(folder, token, init_word, run):  # checkpoints elsewhere: the folders hold only what is said
        spec = ConceptSpec(token=token, init_word=init_word)
        train(cat_latents_dir, folder, spec, settings, checkpoint_dir=tmp_path / run, progress=False)

    train_in(out, "<cat-a>", "cat", "ck1")
    before = (out / "learned_embeds.safetensors").read_bytes()
    with pytest.raises(OnewordError, match="the training of <cat-a>, which training <dog-b> there would replace"):
        train_in(out, "<dog-b>", "dog", "ck2")
    assert (out / "learned_embeds.safetensors").read_bytes() == before and not (out / "a1111" / "dog-b.pt").exists()

    (out / "dataset" / "images" / "stale.png").write_bytes(b"an earlier photo")
    train_in(out, "<cat-a>", "cat", "ck3")
    assert emb_io.load(out / "learned_embeds.safetensors").token == "<cat-a>"
    assert not (out / "dataset" / "images" / "stale.png").exists()  # the photos are this training's only

    mine = tmp_path / "mine"
    mine.mkdir()
    stopped = tmp_path / "stopped"  # a training stopped while it wrote its files, before its summary: its own
    (stopped / "kohya").mkdir(parents=True)
    shutil.copy(out / "learned_embeds.safetensors", stopped)
    train_in(stopped, "<cat-a>", "cat", "ck6")
    with pytest.raises(OnewordError, match="the training of <cat-a>, which"):
        train_in(stopped, "<dog-b>", "dog", "ck7")

    (mine / "learned_embeds.safetensors").write_text("my own file")
    (mine / "notes.txt").write_text("left alone")
    with pytest.raises(OnewordError, match="files no training of oneword wrote"):
        train_in(mine, "<cat-a>", "cat", "ck4")
    assert (mine / "learned_embeds.safetensors").read_text() == "my own file"
    with pytest.raises(OnewordError, match="already in the vocabulary"):  # refused before its folder is made
        train_in(tmp_path / "new", "cat", "cat", "ck5")
    assert not (tmp_path / "new").exists()
