import json
import shutil

import pytest
import torch

from oneword import storage
from oneword.errors import OnewordError
from oneword.models import detect_family, fingerprint, load_base_model, module_fingerprint


def test_loads_local_folder(tiny_model_dir):
    m = load_base_model(str(tiny_model_dir))
    assert m.family == "custom" and m.width == 32
    assert m.prediction_type == "epsilon"
    assert m.fingerprint.startswith("sha256:") and len(m.fingerprint) == 71
    assert not any(p.requires_grad for p in m.unet.parameters())
    assert not any(p.requires_grad for p in m.text_encoder.parameters())


def test_a_model_at_a_relative_path_is_recorded_by_its_absolute_path(tiny_model_dir, tmp_path, monkeypatch):
    """The reference a training records is what serving loads from elsewhere: `xl/model` read from another
    folder is a hub id that does not exist."""
    shutil.copytree(tiny_model_dir, tmp_path / "xl" / "model")
    monkeypatch.chdir(tmp_path)
    m = load_base_model("xl/model")
    assert m.source == str(tmp_path / "xl" / "model") and m.source.startswith("/")
    monkeypatch.chdir("/")
    assert load_base_model(m.source).source == m.source
    (tmp_path / "linked").symlink_to(tmp_path / "xl" / "model")  # a link is kept: its target may lack the suffix
    assert load_base_model(str(tmp_path / "linked")).source == str(tmp_path / "linked")


def test_sd2_style_model(tiny_v_model_dir):
    m = load_base_model(str(tiny_v_model_dir), parts=("unet",))
    assert m.vae is None and m.unet is not None
    assert m.prediction_type == "v_prediction" and m.width == 48
    assert m.tokenizer.pad_token == "!"


@pytest.mark.parametrize(("width", "family"), [(768, "sd1"), (1024, "sd2"), (96, "custom")])
def test_family_from_text_width(width, family):
    from transformers import CLIPTextConfig

    assert detect_family(CLIPTextConfig(hidden_size=width), {"text_encoder": []}) == (family, width)
    assert detect_family(CLIPTextConfig(hidden_size=768), {"text_encoder_2": []})[0] == "sdxl"


def test_fingerprint_is_stable_and_sensitive(tiny_model_dir, tmp_path):
    a = load_base_model(str(tiny_model_dir), parts=())
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    b = load_base_model(str(copy), parts=())
    assert a.fingerprint == b.fingerprint  # same content, other place
    # an fp16 copy of the same weights is the same model
    half = a.text_encoder.half()
    assert fingerprint(a.tokenizer, half, json.loads((copy / "unet/config.json").read_text())) == a.fingerprint
    # one changed embedding row is another model
    with torch.no_grad():
        b.text_encoder.get_input_embeddings().weight[1000] += 1
    assert (
        fingerprint(b.tokenizer, b.text_encoder, json.loads((copy / "unet/config.json").read_text())) != a.fingerprint
    )


def test_vae_fingerprint_changes_with_weights(tiny_model):
    fp = module_fingerprint(tiny_model.vae)
    assert fp == module_fingerprint(tiny_model.vae)
    with torch.no_grad():
        next(tiny_model.vae.parameters()).add_(1)
    assert module_fingerprint(tiny_model.vae) != fp


@pytest.mark.parametrize("source", ["./no/such/folder", "/nonexistent/model.safetensors", "not a model"])
def test_missing_model_is_a_clear_error(source):
    with pytest.raises(OnewordError, match="not found"):
        load_base_model(source)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(OnewordError, match=r"model_index\.json"):
        load_base_model(str(tmp_path))
    with pytest.raises(OnewordError, match="neither a diffusers model folder nor a single-file checkpoint"):
        load_base_model(str(tmp_path / "x.txt"))  # was transformers' "`vocab` and `merges` must be both..."


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OnewordError, match="could not load base model"):
        load_base_model("someone/not-a-real-model-xyz")


def test_incomplete_folder_is_a_clear_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(OnewordError, match="could not load base model"):
        load_base_model(str(broken))
    shutil.rmtree(broken / "unet")  # a part missing whole is named, as preflight names it
    with pytest.raises(OnewordError, match=r"broken has no unet folder"):
        load_base_model(str(broken))


def test_loads_from_s3_once(tiny_model_dir, s3_bucket, monkeypatch, tmp_path):
    # into the model cache (the images': the cluster's shared volume), apart from the photos' and latents' cache
    monkeypatch.setenv("ONEWORD_MODEL_CACHE", str(tmp_path / "models"))
    storage.upload_dir(tiny_model_dir, f"s3://{s3_bucket}/models/tiny")
    m = load_base_model(f"s3://{s3_bucket}/models/tiny")
    assert m.width == 32
    assert list((tmp_path / "models" / "s3" / s3_bucket).glob("*/model_index.json"))
    assert m.fingerprint == load_base_model(str(tiny_model_dir), parts=()).fingerprint
    # a second load reuses the local copy: no object is fetched again
    fetched = []
    real = storage.client

    def counting_client():
        c = real()
        orig = c.fget_object
        c.fget_object = lambda *a, **k: (fetched.append(a[1]), orig(*a, **k))[1]
        return c

    monkeypatch.setattr(storage, "client", counting_client)
    load_base_model(f"s3://{s3_bucket}/models/tiny", parts=())
    assert fetched == []


def test_single_file_that_is_not_a_stable_diffusion_checkpoint(tiny_model_dir, tmp_path):
    """A single file diffusers cannot convert is refused with its path and a hint, not a traceback."""
    from safetensors.torch import save_file

    f = tmp_path / "not-sd.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(OnewordError, match=r"not-sd\.safetensors") as e:
        load_base_model(str(f), model_config=str(tiny_model_dir))
    assert "save_pretrained(folder)" in e.value.hint and "stable-diffusion-v1-5" in e.value.hint


def test_a_model_folder_without_its_parts_is_named_as_preflight_names_it(tmp_path):
    """Loaded, it said "no file named model.safetensors, or pytorch_model.bin", of none of the folder's parts."""
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(OnewordError, match=r"has no tokenizer, text_encoder, vae folder"):
        load_base_model(str(tmp_path))
    with pytest.raises(OnewordError, match=r"has no tokenizer, text_encoder folder"):  # the parts it loads only
        load_base_model(str(tmp_path), parts=())
