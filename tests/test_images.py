import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from oneword import images, storage
from oneword.errors import OnewordError
from oneword.images import Manifest, preprocess

from .conftest import DREAMBENCH


def _png(path, size=(64, 48), colour=(200, 10, 10), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return path


def test_dreambench_photos(tmp_path):
    """Real photos (large JPEGs) of all five DreamBench concepts preprocess cleanly."""
    for concept in ("backpack", "cat", "clock", "dog", "red_cartoon"):
        out = tmp_path / concept
        m = preprocess(DREAMBENCH / concept, out, resolution=64)
        n_files = len(list((DREAMBENCH / concept).glob("*.jpg")))
        assert len(m.images) == n_files and not m.skipped
        for rec in m.images:
            im = Image.open(out / rec.file)
            assert im.size == (64, 64) and im.mode == "RGB"
            assert min(rec.original_size) >= 500
            assert rec.processed_sha256 == images.pixel_sha256(im)
        saved = json.loads((out / "manifest.json").read_text())
        assert saved["resolution"] == 64 and len(saved["images"]) == n_files
        assert Manifest.load(out).images == m.images


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGB", (80, 40), "white")
    im.paste((255, 0, 0), (0, 0, 40, 40))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(src / "rot.jpg", exif=exif.tobytes(), quality=95)
    m = preprocess(src, tmp_path / "out", resolution=40, mode="pad")
    assert m.images[0].original_size == (40, 80)  # upright: portrait
    out = np.asarray(Image.open(tmp_path / "out" / m.images[0].file)).astype(int)
    assert out[5, 20, 0] > 200 and out[5, 20, 1] < 80  # red is now on top
    assert out[35, 20, 1] > 200  # white at the bottom


def test_modes_and_alpha_onto_white(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent blue
    rgba.save(src / "a.png")
    Image.new("L", (32, 32), 100).save(src / "b.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(src / "c.jpg")
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.save(src / "d.gif", transparency=0)
    m = preprocess(src, tmp_path / "out", resolution=16)
    assert len(m.images) == 4
    by_name = {r.source.rsplit("/", 1)[1]: np.asarray(Image.open(tmp_path / "out" / r.file)) for r in m.images}
    assert (by_name["a.png"] == 255).all()  # transparent -> white, not blue or black
    assert (by_name["b.png"] == 100).all()
    assert by_name["d.gif"][0, 0].tolist() == [0, 255, 0]


def test_crop_versus_pad(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGB", (100, 50), (0, 0, 0))
    im.save(src / "wide.png")
    crop = preprocess(src, tmp_path / "crop", resolution=20, mode="crop")
    pad = preprocess(src, tmp_path / "pad", resolution=20, mode="pad")
    c = np.asarray(Image.open(tmp_path / "crop" / crop.images[0].file))
    p = np.asarray(Image.open(tmp_path / "pad" / pad.images[0].file))
    assert (c == 0).all()  # crop keeps only the black middle
    assert (p[0] == 255).all() and (p[10] == 0).all()  # pad adds white bars top and bottom


def test_padding_a_panorama_resizes_before_it_pads_and_says_it_is_mostly_white(tmp_path):
    """Padded at full size first, a 100000 x 1000 photo needed a 10^10-pixel canvas: the process was killed."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (30000, 2000), (0, 0, 0)).save(src / "pano.png")
    m = preprocess(src, tmp_path / "pad", resolution=60, mode="pad")
    p = np.asarray(Image.open(tmp_path / "pad" / m.images[0].file))
    assert p.shape == (60, 60, 3) and (p[0] == 255).all() and (p[30] == 0).all() and (p[:, 0] < 255).any()
    assert any("fills under a quarter" in w for w in m.warnings)


def _matrix_profile(primaries, gamma=2.2) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix and gamma curves), D50-adapted primaries as XYZ columns."""
    import struct

    def s15(x):
        return struct.pack(">i", round(x * 65536))

    def xyz(x, y, z):
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = b"wide gamut test\0"
    tags = [
        (b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 79),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        *[(k, xyz(*v)) for k, v in zip((b"rXYZ", b"gXYZ", b"bXYZ"), primaries)],
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0none\0\0\0\0"),
    ]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table, data = table + sig + struct.pack(">II", offset + len(data), len(body)), data + body
    rest = struct.pack(">I", len(tags)) + table + data
    header = (
        struct.pack(">I", 128 + len(rest))
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + b"\0" * 4
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"\0" * 48
    )
    return header + rest


def test_a_photos_colour_profile_is_applied_and_not_passed_on(tmp_path):
    """Phones tag photos Display P3: read as sRGB numbers, their colours shift (here red by 16, blue by 26)."""
    from PIL import ImageCms

    p3 = _matrix_profile([(0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)])
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(src / "p3.png", icc_profile=p3)
    srgb = ImageCms.createProfile("sRGB")
    want = ImageCms.profileToProfile(
        Image.open(src / "p3.png"),
        ImageCms.ImageCmsProfile(io.BytesIO(p3)),
        srgb,
        renderingIntent=ImageCms.Intent.PERCEPTUAL,
        outputMode="RGB",
    ).getpixel((0, 0))
    m = preprocess(src, tmp_path / "out", resolution=32)
    out = Image.open(tmp_path / "out" / m.images[0].file)
    assert "icc_profile" not in out.info
    got = out.getpixel((16, 16))
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1 and abs(got[2] - 50) > 10, (got, want)


def test_a_transparent_colour_survives_a_colour_profile(tmp_path):
    """Converted through its profile, a PNG's transparent colour (tRNS) was lost: the background came out black."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(src / "logo.png", transparency=(1, 2, 3), icc_profile=srgb)
    m = preprocess(src, tmp_path / "out", resolution=32)
    out = Image.open(tmp_path / "out" / m.images[0].file)
    assert out.getpixel((16, 16)) == (255, 255, 255) and "icc_profile" not in out.info


def test_links_and_an_output_folder_inside_the_photos(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "a.png")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(OnewordError, match="inside the photo folder"):
        preprocess(src, src / "data", resolution=32)
    m = preprocess(src, tmp_path / "data", resolution=32)
    assert [s["source"].rsplit("/", 1)[-1] for s in m.skipped] == ["gone.png"]  # listed, not silently left out


def test_duplicates_are_dropped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "a.png")
    shutil.copy(src / "a.png", src / "b.png")  # same bytes
    Image.new("RGB", (64, 48), (200, 10, 10)).save(src / "c.bmp")  # same pixels, other encoding
    m = preprocess(src, tmp_path / "out", resolution=16)
    assert len(m.images) == 1
    reasons = {s["source"].rsplit("/", 1)[1]: s["reason"] for s in m.skipped}
    assert "exact duplicate" in reasons["b.png"] and "same pixels" in reasons["c.bmp"]


def test_bad_files_are_listed_and_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "good.png")
    (src / "notes.txt").write_text("not an image")
    (src / "fake.jpg").write_bytes(b"this is not a jpeg")
    good = (src / "good.png").read_bytes()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(src / "trunc.jpg")
    data = (src / "trunc.jpg").read_bytes()
    (src / "trunc.jpg").write_bytes(data[: len(data) // 2])
    m = preprocess(src, tmp_path / "out", resolution=16)
    assert [r.source.rsplit("/", 1)[1] for r in m.images] == ["good.png"]
    reasons = {s["source"].rsplit("/", 1)[1]: s["reason"] for s in m.skipped}
    assert set(reasons) == {"notes.txt", "fake.jpg", "trunc.jpg"}
    assert "not an image" in reasons["notes.txt"]
    assert "not an image file Pillow can read" in reasons["fake.jpg"]
    assert "truncated" in reasons["trunc.jpg"]
    assert good == (src / "good.png").read_bytes()  # inputs untouched


def test_damaged_files_that_fail_pillow_in_other_ways_are_skipped_by_name_and_lose_no_other_photo(tmp_path):
    """Pillow fails on some damaged files with SyntaxError, TypeError or struct.error rather than OSError: a PNG
    whose end is zeros from its third IDAT chunk (a copy cut short into a preallocated file), a TIFF whose next
    page lies in its pixels, a camera JPEG's EXIF tag of the wrong type; each stopped the concept with a traceback.
    Beside them: a pipe (read forever), a broken link, a picture without a suffix, a name in Latin-1, a photo in
    a subfolder (trained, and said) and a colour profile LittleCMS refuses (said with the photo's name)."""
    import os

    src = tmp_path / "src"
    (src / "rejected").mkdir(parents=True)
    for i in range(3):
        _png(src / f"good{i}.png", (48, 48), (i * 80, 100, 100))
    _png(src / "rejected" / "blurry.png", (48, 48), (9, 9, 9))
    noise = np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "zero-filled.png", compress_level=0)  # in IDAT chunks of 64 KB
    data, at, idat = (src / "zero-filled.png").read_bytes(), 8, []
    while at < len(data):  # the chunks: length, type, data, crc
        idat += [at] if data[at + 4:at + 8] == b"IDAT" else []
        at += 12 + int.from_bytes(data[at:at + 4], "big")
    (src / "zero-filled.png").write_bytes(data[:idat[2]] + bytes(len(data) - idat[2]))
    _png(src / "scan.tif", (48, 48))
    tif = bytearray((src / "scan.tif").read_bytes())
    ifd = int.from_bytes(tif[4:8], "little")
    after = ifd + 2 + 12 * int.from_bytes(tif[ifd:ifd + 2], "little")
    tif[after:after + 4] = (16).to_bytes(4, "little")  # the next page: inside the pixel data
    (src / "scan.tif").write_bytes(bytes(tif))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"
    raw = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x19\x00\x02")  # Make (text) as tag 281, a number's
    Image.new("RGB", (64, 48), (200, 50, 50)).save(src / "IMG_0042.jpg", exif=raw)
    os.mkfifo(src / "pipe.jpg")
    (src / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    _png(src / "noext.png", (48, 48), (1, 200, 1)).rename(src / "noext")
    Image.new("RGB", (48, 48), (5, 5, 200)).save(os.fsdecode(os.fsencode(src) + b"/caf\xe9.png"))
    bad_icc = _png(src / "icc.png", (48, 48), (20, 200, 20))
    Image.open(bad_icc).save(bad_icc, icc_profile=b"\0" * 200)  # a profile that does not parse

    m = preprocess(src, tmp_path / "out", resolution=32)
    used = sorted(r.source.split("/src/", 1)[1] for r in m.images)
    reasons = {s["source"].split("/src/", 1)[1]: s["reason"] for s in m.skipped}
    assert {"good0.png", "good1.png", "good2.png", "rejected/blurry.png", "icc.png"} <= set(used), (used, reasons)
    assert os.fsdecode(b"caf\xe9.png") in used
    for name in ("zero-filled.png", "scan.tif", "IMG_0042.jpg"):  # damaged: skipped with why, or read
        assert name in used or "copy the photo again" in reasons[name], (name, reasons.get(name))
    assert "zero-filled.png" in reasons  # its pixels cannot be decoded
    assert reasons["pipe.jpg"] == "not a regular file (a pipe or device)"
    assert reasons["gone.jpg"] == "a link that leads to no file"
    assert reasons["noext"] == "a picture without an image suffix (''): rename it noext.png"
    assert "1 of the photos used come from subfolders of" in " ".join(m.warnings)
    assert any(w.endswith("icc.png: its colour profile could not be applied") or "icc.png: its colour profile "
               "could not be applied" in w for w in m.warnings), m.warnings
    from oneword.batch import content_key

    assert content_key(str(src)).startswith("sha256:")  # the plan's key: the Latin-1 name and the pipe pass too


def test_a_cameras_mpo_with_a_preview_is_no_animation(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big, preview = Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (48, 32), (200, 30, 30))
    big.save(src / "DSCF0001.JPG", format="MPO", save_all=True, append_images=[preview])
    assert Image.open(src / "DSCF0001.JPG").n_frames == 2
    m = preprocess(src, tmp_path / "out", resolution=32)
    assert len(m.images) == 1 and not [w for w in m.warnings if "animated" in w], m.warnings


def test_no_valid_image_fails_listing_every_file_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("x")
    (src / "b.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "out"
    with pytest.raises(OnewordError) as e:
        preprocess(src, out)
    assert "a.txt" in str(e.value) and "b.jpg" in str(e.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # no half-written folder left behind


def test_failed_rerun_keeps_previous_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "a.png")
    out = tmp_path / "out"
    preprocess(src, out, resolution=16)
    (src / "a.png").write_bytes(b"now corrupt")
    with pytest.raises(OnewordError):
        preprocess(src, out, resolution=16)
    assert Manifest.load(out).images  # the earlier, good output is still there


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnewordError, match="empty"):
        preprocess(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(OnewordError, match="does not exist"):
        preprocess(tmp_path / "nope", tmp_path / "out")


def test_small_image_warns(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "tiny.png", size=(20, 20))
    m = preprocess(src, tmp_path / "out", resolution=64)
    assert len(m.images) == 1
    assert any("smaller than half" in w and "tiny.png" in w for w in m.warnings)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "ok.png", size=(40, 40))
    _png(src / "bomb.png", size=(400, 400), colour=(0, 0, 0))
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    m = preprocess(src, tmp_path / "out", resolution=16)
    reasons = {s["source"].rsplit("/", 1)[1]: s["reason"] for s in m.skipped}
    said = reasons["bomb.png"]
    assert "400x400 pixels" in said and "more than oneword decodes from a PNG" in said and "downscale it" in said
    assert len(m.images) == 1


def test_a_jpeg_too_large_to_decode_whole_is_decoded_reduced(tmp_path, monkeypatch):
    """A 200 MP phone photo is past oneword's limit and Pillow's guard: as a JPEG it decodes at a fraction of its
    size (still far more pixels than training needs), upright, with its full size recorded; too big even at
    1/8, it is refused, saying how big."""
    src = tmp_path / "src"
    src.mkdir()
    photo = Image.new("RGB", (320, 240), (30, 120, 200))
    photo.paste((250, 250, 0), (0, 0, 160, 240))  # left half yellow
    exif = Image.Exif()
    exif[0x0112] = 6  # shot with the phone turned: shown rotated 90 degrees clockwise
    photo.save(src / "phone.jpg", quality=95, exif=exif)
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)  # 76,800 pixels: reduced by 4 (4,800), not by 2
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # Pillow refuses it from 40,000
    m = preprocess(src, tmp_path / "out", resolution=32)
    assert not m.skipped and [r.original_size for r in m.images] == [(240, 320)]  # upright, as the photo shows
    out = Image.open(tmp_path / "out" / m.images[0].file)
    top, bottom = out.getpixel((16, 2)), out.getpixel((16, 29))
    assert top[2] < 100 < bottom[2], (top, bottom)  # turned: the yellow half on top, the blue one below
    monkeypatch.setattr(images, "MAX_PIXELS", 1_000)  # 76,800 / 64 is still over it
    with pytest.raises(OnewordError, match=r"320x240 pixels \(0 MP\) is more than oneword decodes from a JPEG"):
        preprocess(src, tmp_path / "refused", resolution=16)


def test_a_photo_past_pillows_warning_but_under_oneword_limit_is_kept(tmp_path, monkeypatch):
    """Pillow warns from 89 MP; a 108 MP phone photo is a photo, not a bomb (oneword's limit is 120 MP)."""
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "big.png", size=(120, 120))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # warns from 10,000 pixels, refuses from 20,000
    m = preprocess(src, tmp_path / "out", resolution=16)
    assert [r.original_size for r in m.images] == [(120, 120)] and not m.skipped


def test_photos_that_cannot_be_read_are_skipped_with_what_to_do(tmp_path, monkeypatch):
    from pathlib import Path

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png"):
        _png(src / name, colour=(10, 200, 10) if name == "a.png" else (10, 10, 200))
    (src / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (src / "IMG_0002.jpg").write_bytes(b"")  # a copy that never finished
    real = Path.read_bytes

    def denied(self):  # a photo copied from another account, readable by its owner only
        if self.name == "b.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    m = preprocess(src, tmp_path / "out", resolution=16)
    reasons = {s["source"].rsplit("/", 1)[1]: s["reason"] for s in m.skipped}
    assert "export it as JPEG" in reasons["IMG_0001.HEIC"] and "Permission denied" in reasons["b.png"]
    assert reasons["IMG_0002.jpg"] == "empty file (0 bytes): copy the photo again"
    assert len(m.images) == 1  # the readable photo is kept: one bad file loses no other


def test_padding_judges_a_photo_by_its_long_side(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "banner.png", size=(60, 10))
    with pytest.raises(OnewordError, match="short side must be at least 16"):
        preprocess(src, tmp_path / "crop", resolution=64)  # cropped to 10 x 10: upscaled 6x
    m = preprocess(src, tmp_path / "pad", resolution=64, mode="pad")  # padded to 60 x 60: scaled about 1x
    assert len(m.images) == 1 and not any("blurry" in w for w in m.warnings)  # but mostly white: said so


def test_too_few_or_very_many_photos_are_said(tmp_path, monkeypatch):
    """One photo trains (the user may mean it), but its pose and background are learned with it; a folder of
    dozens is often not one concept's. Both are said; 3-5 photos pass without a word."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(images.MANY_PHOTOS + 1):
        _png(src / f"{i:02d}.png", size=(40, 40), colour=(i * 8, 100, 200 - i * 5))
    m = preprocess(src, tmp_path / "many", resolution=16)
    assert any(f"gives {images.MANY_PHOTOS + 1} photos" in w and "one concept" in w for w in m.warnings), m.warnings
    for f in sorted(src.iterdir())[4:]:
        f.unlink()
    assert not preprocess(src, tmp_path / "four", resolution=16).warnings
    for f in sorted(src.iterdir())[1:]:
        f.unlink()
    m = preprocess(src, tmp_path / "one", resolution=16)
    assert any("gives 1 photo:" in w and "pose and background" in w for w in m.warnings), m.warnings


def test_pillow_bomb_error_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "bomb.png", size=(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own guard fires first
    with pytest.raises(OnewordError, match="decompression bomb"):
        preprocess(src, tmp_path / "out", resolution=16)


def test_images_from_s3(tmp_path, s3_bucket):
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "a.png", colour=(1, 2, 3))
    _png(src / "b.png", colour=(4, 5, 6))
    storage.upload_dir(src, f"s3://{s3_bucket}/concepts/x")
    m = preprocess(f"s3://{s3_bucket}/concepts/x", tmp_path / "out", resolution=16)
    assert sorted(r.source for r in m.images) == [
        f"s3://{s3_bucket}/concepts/x/a.png",
        f"s3://{s3_bucket}/concepts/x/b.png",
    ]


def test_an_s3_folder_follows_its_prefix_and_fills_once_under_parallel_steps(tmp_path, s3_bucket, monkeypatch):
    import os
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        _png(src / f"{i}.png", size=(64, 64), colour=(i, 2 * i, 3 * i))
    uri = f"s3://{s3_bucket}/concepts/y"
    storage.upload_dir(src, uri)
    monkeypatch.setenv("ONEWORD_CACHE", str(tmp_path / "cache"))
    # two processes fill the same cache folder at once (kfp.local runs ParallelFor iterations so)
    code = "import sys; from oneword import storage; print(storage.download_prefix(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], env=os.environ.copy(), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    folders = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0] and len(folders) == 1
    folder = storage.download_prefix(uri)
    assert str(folder) in folders
    assert sorted(f.name for f in images.discover_images(uri)) == [f"{i}.png" for i in range(6)]
    assert all((folder / f"{i}.png").read_bytes() == (src / f"{i}.png").read_bytes() for i in range(6))
    # a photo taken out of the bucket leaves the folder too, and so does a download a kill cut short
    storage.upload_file(src / "0.png", f"{uri}/extra/more/6.png")
    storage.download_prefix(uri)
    assert (folder / "extra/more/6.png").exists()
    storage.client().remove_object(s3_bucket, "concepts/y/3.png")
    storage.client().remove_object(s3_bucket, "concepts/y/extra/more/6.png")
    (folder / ".4.png.999.part").write_bytes(b"half")
    storage.download_prefix(uri)
    # ...and a sub-prefix whose objects are all gone leaves no empty folders behind
    assert sorted(f.name for f in folder.iterdir() if not f.name.startswith(".oneword-s3")) == [
        "0.png", "1.png", "2.png", "4.png", "5.png"
    ]  # fmt: skip


def test_an_s3_key_that_climbs_out_of_its_folder_is_refused(tmp_path, s3_bucket, monkeypatch):
    import os

    import boto3

    monkeypatch.setenv("ONEWORD_CACHE", str(tmp_path / "cache"))
    # MinIO's client refuses to write such a key, but other S3 stores hold them
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"], region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="concepts/z/../../escape.png", Body=b"x")
    with pytest.raises(OnewordError, match="outside its folder"):
        storage.download_prefix(f"s3://{s3_bucket}/concepts/z")
    assert not (tmp_path / "escape.png").exists()


def test_an_output_folder_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with storage.atomic_dir(final) as d:
        (d / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first" and final.stat().st_mode & 0o777 == 0o755
    with pytest.raises(RuntimeError), storage.atomic_dir(final) as d:
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed half-way")
    assert (final / "a.txt").read_text() == "first"
    with storage.atomic_dir(final) as d:
        (d / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]  # no temporary or old folder


def test_a_folder_that_is_not_an_earlier_output_of_the_step_is_never_replaced(tmp_path, capsys):
    from oneword.cli import main
    from oneword.evaluation.evaluate import EvalConfig, evaluate
    from oneword.latents import cache_latents

    work = tmp_path / "runs" / "my-cat"  # a slip: -o the concept's folder, which holds its training
    (work / "train").mkdir(parents=True)
    (work / "train" / "learned_embeds.safetensors").write_bytes(b"weeks of GPU time")
    with pytest.raises(OnewordError, match=r"my-cat already holds files and is not a dataset .* no manifest.json"):
        preprocess(DREAMBENCH / "cat", work, resolution=32)
    with pytest.raises(OnewordError, match=r"is not an evaluation .* no metrics.json"):  # before any sampling
        evaluate(work / "train", work / "data", work, EvalConfig())
    with pytest.raises(OnewordError, match="is not a latent cache"):
        cache_latents(preprocess(DREAMBENCH / "cat", tmp_path / "data", resolution=32) and tmp_path / "data",
                      "toyworld", work)  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(work)])
    assert exit_.value.code == 2 and "refusing to replace it" in capsys.readouterr().err
    assert (work / "train" / "learned_embeds.safetensors").read_bytes() == b"weeks of GPU time"
    assert sorted(p.name for p in work.iterdir()) == ["train"]  # nothing beside it either

    preprocess(DREAMBENCH / "cat", tmp_path / "data", resolution=16)  # an earlier dataset is replaced
    assert Manifest.load(tmp_path / "data").resolution == 16
    with pytest.raises(OnewordError, match="is a file"):
        preprocess(DREAMBENCH / "cat", work / "train" / "learned_embeds.safetensors", resolution=32)


def test_output_folders_written_at_once_by_two_processes_leave_one_whole(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from oneword import storage\n"
        "with storage.atomic_dir(Path(sys.argv[1])) as d:\n"
        "    for i in range(50):\n"
        "        (d / f'{i}.txt').write_text(sys.argv[2])\n"
        "    time.sleep(0.2)\n"
    )
    final = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(final), w]) for w in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    written = {f.read_text() for f in final.iterdir()}
    assert len(list(final.iterdir())) == 50 and len(written) == 1  # one writer's whole output, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_a_folder_with_no_photo_left_says_each_skipped_file_once(tmp_path, caplog):
    """Each skipped file was warned of, and then listed again in the error that followed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not an image")
    (src / "fake.jpg").write_bytes(b"this is not a jpeg")
    with caplog.at_level("WARNING"), pytest.raises(OnewordError) as e:
        preprocess(src, tmp_path / "out", resolution=16)
    assert "notes.txt: not an image file" in e.value.message and "fake.jpg" in e.value.message
    assert "notes.txt" not in caplog.text and "fake.jpg" not in caplog.text
    _png(src / "good.png")  # with a photo left, the log is where each skipped file is said
    with caplog.at_level("WARNING"):
        preprocess(src, tmp_path / "out", resolution=16)
    assert "skipped" in caplog.text and "notes.txt" in caplog.text
