"""Preflight: every problem a run would meet later, listed at once with its fix, in seconds."""

import time

import pytest

from oneword.errors import OnewordError, TransientError
from oneword.preflight import preflight

from .conftest import DREAMBENCH, free_port


def test_a_sound_run_passes(tiny_model_dir, tiny_clip_dir, tmp_path):
    passed = preflight(
        str(tiny_model_dir),
        [{"images": str(DREAMBENCH / "cat"), "token": "<cat-pf>", "init_word": "cat"}],
        str(tiny_clip_dir),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert passed == ["base model", "evaluator", "tracking", "images of <cat-pf>", "token <cat-pf>"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in space\n")
    passed = preflight(
        str(tiny_model_dir), [], "toyworld-clip", None, prompt_set=str(prompts), dino_model="toyworld-dino"
    )
    assert passed == ["base model", "evaluator", "DINO evaluator", "prompt set"]


def test_photos_in_subfolders_count_as_preprocess_finds_them(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(DREAMBENCH / "cat", tmp_path / "photos" / "2024")
    concept = {"images": str(tmp_path / "photos"), "token": "<cat-sub>", "init_word": "cat"}
    assert "images of <cat-sub>" in preflight(str(tiny_model_dir), [concept], "toyworld-clip", None)
    shutil.move(tmp_path / "photos" / "2024", tmp_path / "photos" / ".hidden")
    with pytest.raises(OnewordError, match="no images in"):
        preflight(str(tiny_model_dir), [concept], "toyworld-clip", None)
    (tmp_path / "photos" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")  # an iPhone's
    with pytest.raises(OnewordError, match=r"are \.heic files.*Most Compatible"):
        preflight(str(tiny_model_dir), [concept], "toyworld-clip", None)
    (tmp_path / "photos" / "b.jpg").write_text("not a picture")  # named as one: preprocess would read none
    with pytest.raises(OnewordError, match=r"no file in .*photos is a picture Pillow can read \(b\.jpg, \.\.\.\)"):
        preflight(str(tiny_model_dir), [concept], "toyworld-clip", None)
    shutil.copy(DREAMBENCH / "cat" / "00.jpg", tmp_path / "photos" / "c.jpg")
    assert "images of <cat-sub>" in preflight(str(tiny_model_dir), [concept], "toyworld-clip", None)


def test_the_evaluations_settings_are_checked_before_the_training_they_would_end(tiny_model_dir, tmp_path):
    with pytest.raises(OnewordError) as e:
        preflight(str(tiny_model_dir), [], "toyworld-clip", None, prompt_set="neti-15",
                  dino_model=str(tmp_path / "dino-vit16"))  # fmt: skip
    text = e.value.message
    assert "preflight found 2 problem(s)" in text, text
    assert "prompt set 'neti-15': unknown prompt set" in text and "the DINO evaluator" in text, text
    assert "--dino-model" in text and "leave it empty to skip DINO" in text, text


def test_every_problem_is_listed_at_once_with_its_fix(tiny_model_dir, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(OnewordError) as e:
        preflight(
            str(tiny_model_dir),
            [
                {"images": str(tmp_path / "no-photos"), "token": "<a-pf>", "init_word": "cat"},
                {"images": str(DREAMBENCH / "cat"), "token": "cat", "init_word": "cat"},
                {"images": str(DREAMBENCH / "cat"), "token": "<b-pf>", "init_word": "big cat"},
                {"images": str(DREAMBENCH / "cat"), "token": "dog", "init_word": "big dog"},  # two of one concept
            ],
            str(tmp_path / "no-such-clip"),
            f"http://127.0.0.1:{free_port()}",  # nothing listens there
        )
    seconds = time.perf_counter() - t0
    text = e.value.message
    assert "preflight found 7 problem(s)" in text, text
    for expected in ("no-such-clip", "--clip-model", "tracking server", "no-photos", "'cat'", "big cat", "'dog'",
                     "big dog"):  # fmt: skip
        assert expected in text, (expected, text)
    assert seconds < 30, seconds  # no minute of retries against a server that is down
    assert not isinstance(e.value, TransientError)  # its other problems are not weather: no step retries it


def test_a_server_that_did_not_answer_alone_is_a_problem_a_retry_may_cure(tiny_model_dir, tiny_clip_dir):
    """A store restarting at 02:00 fails a preflight whose every problem is a server that did not answer: the
    step tries it again (`outcome.retrying`) rather than lose the night."""
    from oneword.outcome import transient

    with pytest.raises(TransientError, match="did not answer") as e:
        preflight(str(tiny_model_dir), clip_model=str(tiny_clip_dir), tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert transient(e.value)


def test_buckets_are_checked_with_the_credentials_given(tiny_model_dir, tiny_clip_dir, s3_bucket, tmp_path):
    where = dict(clip_model=str(tiny_clip_dir), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(OnewordError, match="bucket 'no-such-bucket-pf' does not exist"):
        preflight(str(tiny_model_dir), checkpoint_root="s3://no-such-bucket-pf/checkpoints", **where)
    assert "bucket " + s3_bucket in preflight(
        str(tiny_model_dir), checkpoint_root=f"s3://{s3_bucket}/checkpoints", **where
    )


def test_an_incomplete_model_folder_is_named(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(OnewordError, match=": no unet/ folder"):
        preflight(str(broken), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_check_that_raises_is_listed_beside_the_others(tiny_model_dir, tmp_path, monkeypatch):
    from oneword import preflight as pf

    def denied(bucket):
        raise RuntimeError("S3 operation failed; code: AccessDenied")

    monkeypatch.setattr(pf, "_bucket_problem", denied)
    with pytest.raises(OnewordError) as e:
        preflight(
            str(tiny_model_dir),
            [{"images": str(tmp_path / "none"), "token": "<c-pf>", "init_word": "cat", "n_vectors": 0}],
            str(tmp_path / "no-such-clip"),
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            checkpoint_root="s3://some-bucket/ckpt",
        )
    text = e.value.message
    assert "preflight found 4 problem(s)" in text, text
    for expected in ("bucket some-bucket could not be checked", "AccessDenied", "no-such-clip", "none", "n_vectors"):
        assert expected in text, (expected, text)


def test_photos_that_cannot_be_listed_in_a_bucket_that_answers_are_a_problem(tiny_model_dir, s3_bucket, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    from oneword import storage

    def denied(uri):
        raise RuntimeError("S3 operation failed; code: AccessDenied, message: ListObjectsV2")

    monkeypatch.setattr(storage, "list_objects", denied)
    concept = {"images": f"s3://{s3_bucket}/photos/x", "token": "<d-pf>", "init_word": "cat"}
    with pytest.raises(OnewordError, match=r"<d-pf>: cannot list s3://.*AccessDenied.*s3:ListBucket"):
        preflight(str(tiny_model_dir), [concept], tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize(("var", "value"), [("HF_HUB_OFFLINE", "ON"), ("TRANSFORMERS_OFFLINE", "1")])
def test_the_hub_is_not_asked_when_switched_off_in_any_spelling(var, value, monkeypatch):
    import requests

    from oneword import hub

    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(requests, "head", lambda *a, **k: pytest.fail("asked the hub while offline"))
    assert hub.offline() and hub.reachable("openai/clip-vit-base-patch32", "config.json") is None


def test_a_bucket_endpoint_that_never_answers_is_reported_in_seconds(monkeypatch):
    """An endpoint that takes the connection and stays silent (a proxy in front of nothing): minio's own client
    would wait 5 minutes a try, 6 tries, before preflight could say anything."""
    import socket

    from oneword import preflight as pf

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or answers
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr(pf, "CHECK_TIMEOUT_S", 1.0)
    t0 = time.perf_counter()
    try:
        problem, hint, weather = pf._bucket_problem("oneword-artifacts")
    finally:
        silent.close()
    assert problem and "does not answer" in problem and "S3_ENDPOINT_URL" in hint
    assert weather  # a problem a later try may not meet: the step tries again
    assert time.perf_counter() - t0 < 15


def test_a_name_the_registry_holds_as_no_concept_is_refused_before_training(tiny_model_dir, tmp_path):
    """A concept named as a bundle (or another tool's model) would fail at register, after the GPU work."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cat = {"images": str(DREAMBENCH / "cat"), "token": "<cat-pf>", "init_word": "cat"}
    assert "registered names" in preflight(str(tiny_model_dir), [{**cat, "name": "new-cat"}], "toyworld-clip", uri)
    mlflow.MlflowClient(uri).create_registered_model("studio", tags={"oneword.bundle": "true"})
    with pytest.raises(OnewordError, match="holds 'studio' as a bundle of concepts, not a concept") as refused:
        preflight(str(tiny_model_dir), [{**cat, "name": "studio"}], "toyworld-clip", uri)
    assert "name: in the manifest" in refused.value.message  # the fix, in the list of problems


def test_a_picture_of_more_pixels_than_pillow_opens_unasked_is_still_a_picture(tmp_path, monkeypatch):
    """A 200 MP phone photo: Pillow refuses it as a decompression bomb, preprocess opens it reduced."""
    from PIL import Image

    from oneword.images import opens as _opens  # what preflight asks of each photo

    Image.new("RGB", (64, 64)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is past twice it: what Pillow refuses
    assert _opens(tmp_path / "big.jpg")
    (tmp_path / "b.jpg").write_text("not a picture")
    assert not _opens(tmp_path / "b.jpg")
