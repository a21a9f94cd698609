import json
import re
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

    assert detect_family(CLIPTextConfig(hidden_size=width)) == (family, width)
    assert detect_family(CLIPTextConfig(hidden_size=768), xl=True)[0] == "sdxl"


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


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OnewordError, match="could not load base model"):
        load_base_model("someone/not-a-real-model-xyz")
    # a local path mistyped reads as a hub id (ORG/NAME): the hint says what the local folder holds
    (tmp_path / "models" / "sd15-real").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OnewordError) as e:
        load_base_model("models/sd15-rael")
    assert "a local folder? models/sd15-rael is none (models/ holds sd15-real)" in e.value.hint


def test_incomplete_folder_is_a_clear_error(tiny_model_dir, tmp_path):
    """A download cut short: a part without weights, a part or the scheduler's config missing, each named (it
    said "no file named model.safetensors, or pytorch_model.bin, found in directory" of the top folder), as
    preflight names them, before any step runs."""
    from oneword.preflight import _base_model_problem

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for weights in (broken / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    said = r"broken: no weights in text_encoder/; no scheduler/scheduler_config.json"
    with pytest.raises(OnewordError, match=said):
        load_base_model(str(broken))
    assert re.search(said, _base_model_problem(str(broken))[0])
    shutil.rmtree(broken / "unet")  # a part missing whole is named, as preflight names it
    with pytest.raises(OnewordError, match=r"broken: no unet/ folder; no weights in text_encoder/"):
        load_base_model(str(broken))


def test_a_folder_saved_with_a_variant_alone_loads_it(tiny_model_dir, tmp_path):
    """`save_pretrained(..., variant="fp16")`, or a download of that variant alone, holds only
    `*.fp16.safetensors`, which a plain `from_pretrained` does not find."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    half = tmp_path / "fp16"
    pipe.to(torch.float16).save_pretrained(half, variant="fp16")
    assert not list(half.glob("unet/diffusion_pytorch_model.safetensors"))
    assert list(half.glob("unet/diffusion_pytorch_model.fp16.safetensors"))
    m, plain = load_base_model(str(half)), load_base_model(str(tiny_model_dir))
    assert m.fingerprint == plain.fingerprint  # taken in fp16: the same weights, halved
    assert torch.equal(m.unet.conv_in.weight, plain.unet.conv_in.weight.half().float())


def test_what_a_model_folder_holds_beside_its_weights_is_not_read(tmp_path):
    """A hub repository's mirror: other frameworks' weights, a format twice, variants and single files beside the
    folders; a load reads one file of weights per part, and an `s3://` model downloads just those."""
    from oneword.model_files import choose_weights, has_part, model_keys

    keys = [
        "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "README.md",
        "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
        "text_encoder/model.fp16.safetensors", "text_encoder/flax_model.msgpack",
        "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_flax_model.msgpack", "unet/model.onnx",
        "vae/config.json", "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json", "vae/diffusion_pytorch_model.fp16.bin",
        "safety_checker/pytorch_model.bin", "feature_extractor/preprocessor_config.json",
    ]  # fmt: skip
    assert model_keys(keys) == {
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "text_encoder/config.json", "text_encoder/model.safetensors", "unet/config.json",
        "unet/diffusion_pytorch_model.bin", "vae/config.json",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
    }  # fmt: skip
    assert choose_weights(["model.fp16.safetensors", "model.bf16.safetensors", "config.json"]) == (
        "fp16", {"model.fp16.safetensors"})  # fmt: skip
    # OpenVINO's weights, a LoRA: files of those formats that are not the part's own
    assert choose_weights(["openvino_model.bin", "pytorch_lora_weights.bin", "model.fp16.safetensors"]) == (
        "fp16", {"model.fp16.safetensors"})  # fmt: skip
    assert "unet/openvino_model.bin" not in model_keys([*keys, "unet/openvino_model.bin"])
    assert model_keys(["model.safetensors"]) == {"model.safetensors"}  # no diffusers folder: all of it
    assert not has_part({"text_encoder_2": [None, None]}, "text_encoder_2")
    assert has_part({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, "text_encoder_2")


def test_loads_from_s3_once(tiny_model_dir, s3_bucket, monkeypatch, tmp_path):
    # into the model cache (the images': the cluster's shared volume), apart from the photos' and latents' cache
    monkeypatch.setenv("ONEWORD_MODEL_CACHE", str(tmp_path / "models"))
    storage.upload_dir(tiny_model_dir, f"s3://{s3_bucket}/models/tiny")
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 1000)
    for key in ("tiny.ckpt", "unet/diffusion_flax_model.msgpack", "vae/diffusion_pytorch_model.bin"):  # a mirror's
        storage.upload_file(junk, f"s3://{s3_bucket}/models/tiny/{key}")
    m = load_base_model(f"s3://{s3_bucket}/models/tiny")
    assert m.width == 32
    (copy,) = [p.parent for p in (tmp_path / "models" / "s3" / s3_bucket).glob("*/model_index.json")]
    assert {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file() and ".oneword" not in p.name} == {
        p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*") if p.is_file()}  # fmt: skip
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
    with pytest.raises(OnewordError, match=r": no tokenizer/ folder; no text_encoder/ folder; no vae/ folder"):
        load_base_model(str(tmp_path))
    with pytest.raises(OnewordError, match=r": no tokenizer/ folder; no text_encoder/ folder; no sch"):  # its own
        load_base_model(str(tmp_path), parts=())
