import numpy as np
import pytest
import torch
from PIL import Image

from oneword.errors import OnewordError
from oneword.images import Manifest
from oneword.latents import LatentSet, cache_latents


def test_shapes_and_metadata(cat_latents, tiny_model_dir):
    lat = cat_latents
    assert lat.mean.shape == (5, 2, 4, 8, 8) and lat.std.shape == lat.mean.shape
    assert (lat.std > 0).all()
    assert lat.meta["model_source"] == str(tiny_model_dir)
    assert lat.meta["vae_fingerprint"].startswith("sha256:")
    assert lat.scaling_factor == pytest.approx(0.18215)


def test_cached_entries_match_encoding_and_mirror(cat_dataset, tiny_model, cat_latents):
    m = Manifest.load(cat_dataset)
    im = Image.open(cat_dataset / m.images[2].file)
    for flip, picture in ((0, im), (1, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        x = torch.from_numpy(np.asarray(picture, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            dist = tiny_model.vae.encode(x).latent_dist
        torch.testing.assert_close(cat_latents.mean[2, flip], dist.mean[0])
        torch.testing.assert_close(cat_latents.std[2, flip], dist.std[0])


def test_stored_distribution_samples_exactly_like_encoding(cat_dataset, tiny_model, cat_latents):
    """mean + std * eps, with the generator the VAE would use, is the VAE's own sample."""
    m = Manifest.load(cat_dataset)
    im = Image.open(cat_dataset / m.images[0].file)
    x = torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        theirs = tiny_model.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(cat_latents.mean[0, 0][None].shape, generator=torch.Generator().manual_seed(7))
    ours = cat_latents.mean[0, 0] + cat_latents.std[0, 0] * eps
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_rerun_reuses_the_shared_cache(cat_dataset, tiny_model, tmp_path, monkeypatch):
    first = cache_latents(cat_dataset, tiny_model, tmp_path / "a", cache_dir=tmp_path / "cache")
    n_files = len(list((tmp_path / "cache").rglob("*.safetensors")))
    assert n_files == 10  # 5 images x 2 flips

    def boom(*a, **k):
        raise AssertionError("the VAE must not run again")

    monkeypatch.setattr(tiny_model.vae, "encode", boom)
    second = cache_latents(cat_dataset, tiny_model, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert torch.equal(first.mean, second.mean) and torch.equal(first.std, second.std)
    assert LatentSet.load(tmp_path / "b").image_sha256 == first.image_sha256


def test_a_dataset_image_changed_since_preprocess_never_reaches_the_shared_cache(cat_dataset, tiny_model, tmp_path):
    """Its latents would be cached under the original's hash, for every run that shares the cache."""
    import os
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(cat_dataset, edited)
    first = sorted((edited / "images").glob("*.png"))[0]
    Image.new("RGB", Image.open(first).size, (0, 255, 0)).save(first)
    with pytest.raises(OnewordError, match=f"{first.name} is not the image its manifest names"):
        cache_latents(edited, tiny_model, tmp_path / "a", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    first.write_bytes(first.read_bytes()[:40])  # truncated
    with pytest.raises(OnewordError, match=f"{first.name} cannot be read") as e:
        cache_latents(edited, tiny_model, tmp_path / "a", cache_dir=tmp_path / "cache")
    assert "oneword preprocess" in e.value.hint
    # what is written is readable by other users, as the umask says (safetensors writes 0600)
    umask = os.umask(0o022)
    os.umask(umask)
    cache_latents(cat_dataset, tiny_model, tmp_path / "b", cache_dir=tmp_path / "cache")
    written = [tmp_path / "b" / "latents.safetensors", *(tmp_path / "cache").rglob("*.safetensors")]
    assert {f.stat().st_mode & 0o777 for f in written} == {0o666 & ~umask}


def test_missing_inputs_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(OnewordError, match="oneword preprocess"):
        cache_latents(tmp_path, tiny_model, tmp_path / "out")
    with pytest.raises(OnewordError, match="cache-latents"):
        LatentSet.load(tmp_path / "nothing")


def test_damaged_latents_are_refused_on_loading(cat_latents, tmp_path):
    import dataclasses

    damaged = dataclasses.replace(cat_latents, mean=cat_latents.mean.clone())
    damaged.mean[2, 0, 1, 3, 3] = float("nan")
    path = damaged.save(tmp_path / "damaged")
    with pytest.raises(OnewordError, match=r"non-finite.*'mean'") as e:
        LatentSet.load(tmp_path / "damaged")
    assert str(path) in e.value.message and "cache-latents" in e.value.hint


def test_a_damaged_shared_cache_entry_is_encoded_again(cat_dataset, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    first = cache_latents(cat_dataset, tiny_model, tmp_path / "one", cache_dir=cache)
    entries = sorted(cache.rglob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    poisoned = load_file(str(entries[0]))
    poisoned["mean"][0, 0, 0] = float("nan")
    save_file(poisoned, str(entries[0]))
    entries[1].write_bytes(entries[1].read_bytes()[:40])  # cut short by a kill
    again = cache_latents(cat_dataset, tiny_model, tmp_path / "two", cache_dir=cache)
    torch.testing.assert_close(again.mean, first.mean)
    assert torch.isfinite(load_file(str(entries[0]))["mean"]).all()  # replaced in the cache too


def test_images_at_another_size_than_the_models_are_pointed_out(tiny_model, tmp_path, caplog):
    import logging

    from oneword.images import preprocess

    from .conftest import DREAMBENCH

    preprocess(DREAMBENCH / "cat", tmp_path / "data", resolution=48)  # the tiny model draws at 32 px
    with caplog.at_level(logging.WARNING):
        cache_latents(tmp_path / "data", tiny_model, tmp_path / "latents", cache_dir=tmp_path / "cache")
    assert "are 48 px" in caplog.text and "draws at 32 px" in caplog.text and "--resolution 32" in caplog.text
