"""Every Pillow mode a camera or an editor writes comes out of `preprocess` as the right RGB picture.

Each case builds a picture whose left half is one known value and right half another, in the mode under test,
saves it in a format that keeps that mode, preprocesses it and compares both halves of the output with the RGB
colours they must become. Modes no common format can hold (HSV, premultiplied alpha, native-endian 16 bit) are
checked through `to_rgb` on an in-memory image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from oneword.errors import OnewordError
from oneword.images import preprocess, to_rgb

SIDE = 40  # picture and output side, so the halves are compared without rescaling
HALF = SIDE // 2
MARGIN = 4  # columns left out next to the edges and the seam, where resampling and JPEG blur the halves
TOLERANCE = 8  # mean absolute error allowed per half, in 8-bit levels (JPEG and colour-management rounding)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
PALETTE = [200, 30, 40, 10, 120, 220]  # index 0 and index 1


@dataclass(frozen=True)
class Case:
    """A two-half picture in `mode` and the RGB colour each half must come out as."""

    mode: str
    left: object
    right: object
    want_left: tuple[int, int, int]
    want_right: tuple[int, int, int]
    suffix: str | None  # file format that keeps the mode; None: no common format can, test `to_rgb` directly
    read_as: str | None = None  # the mode Pillow reads the file back in, where it differs from `mode`
    save: dict = field(default_factory=dict)
    palette: list[int] | None = None


def grey(v: int) -> tuple[int, int, int]:
    return (v, v, v)


CASES = {
    "1": Case("1", 0, 1, grey(0), WHITE, ".png"),
    "L": Case("L", 60, 200, grey(60), grey(200), ".png"),
    "LA": Case("LA", (60, 255), (0, 0), grey(60), WHITE, ".png"),  # right half fully transparent
    "La": Case("La", (60, 255), (100, 128), grey(60), grey(100 + 127), None),  # premultiplied: v + white*(1-a)
    "P": Case("P", 0, 1, (200, 30, 40), (10, 120, 220), ".png", palette=PALETTE),
    "P-transparency": Case("P", 0, 1, (200, 30, 40), WHITE, ".png", save={"transparency": 1}, palette=PALETTE),
    "PA": Case("PA", (0, 255), (1, 0), (200, 30, 40), WHITE, ".tif", palette=PALETTE),
    "I-8bit": Case("I", 60, 200, grey(60), grey(200), ".tif"),
    "I-16bit": Case("I", 257 * 60, 257 * 200, grey(60), grey(200), ".tif"),
    "I-32bit": Case("I", 1_000_000, 4_000_000, grey(64), WHITE, ".tif"),  # scaled to its brightest pixel
    "I;16": Case("I;16", 257 * 60, 257 * 200, grey(60), grey(200), ".png"),
    "I;16-dark": Case("I;16", 257 * 2, 257 * 100, grey(2), grey(100), ".png"),  # not stretched to its max
    "I;16B": Case("I;16B", 257 * 60, 257 * 200, grey(60), grey(200), ".tif"),
    "I;16L": Case("I;16L", 257 * 60, 257 * 200, grey(60), grey(200), ".tif", read_as="I;16"),
    "I;16N": Case("I;16N", 257 * 60, 257 * 200, grey(60), grey(200), None),
    "F-unit": Case("F", 0.25, 0.8, grey(64), grey(204), ".tif"),
    "F-8bit": Case("F", 60.0, 200.0, grey(60), grey(200), ".tif"),
    "RGB": Case("RGB", (200, 30, 40), (10, 120, 220), (200, 30, 40), (10, 120, 220), ".png"),
    "RGBA": Case("RGBA", (200, 30, 40, 255), (0, 0, 255, 128), (200, 30, 40), (127, 127, 255), ".png"),
    "RGBa": Case("RGBa", (200, 30, 40, 255), (0, 0, 128, 128), (200, 30, 40), (127, 127, 255), None),
    # naive CMYK (no ICC profile): R = (255 - C)(255 - K) / 255
    "CMYK": Case("CMYK", (0, 255, 255, 0), (0, 0, 0, 128), RED, grey(127), ".jpg", save={"quality": 95}),
    # JFIF YCbCr of pure red and pure blue (a JPEG would be read back as RGB, so TIFF keeps the mode)
    "YCbCr": Case("YCbCr", (76, 85, 255), (29, 255, 107), RED, BLUE, ".tif"),
    # CIE Lab (D50, ICC) encoded as L*2.55, a+128, b+128: L*=50 grey is sRGB 119; sRGB red is (54.3, 80.8, 69.9)
    "LAB": Case("LAB", (128, 128, 128), (138, 209, 198), grey(119), RED, ".tif"),
    "HSV": Case("HSV", (0, 255, 255), (170, 255, 200), RED, (0, 0, 200), None),
}


def build(case: Case) -> Image.Image:
    im = Image.new(case.mode, (SIDE, SIDE), case.left)
    im.paste(Image.new(case.mode, (SIDE - HALF, SIDE), case.right), (HALF, 0))
    if case.palette:
        im.putpalette(case.palette)
    return im


def assert_halves(out: Image.Image, case: Case) -> None:
    assert out.mode == "RGB" and out.size == (SIDE, SIDE)
    a = np.asarray(out).astype(float)
    for cols, want in (
        (slice(MARGIN, HALF - MARGIN), case.want_left),
        (slice(HALF + MARGIN, SIDE - MARGIN), case.want_right),
    ):
        err = np.abs(a[:, cols] - np.array(want, dtype=float)).mean()
        got = a[:, cols].reshape(-1, 3).mean(axis=0).round().astype(int).tolist()
        assert err < TOLERANCE, f"{case.mode}: expected {want}, got about {got} (mean error {err:.1f})"


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_mode_comes_out_as_the_right_rgb_picture(case, tmp_path):
    im = build(case)
    if case.suffix is None:
        assert_halves(to_rgb(im), case)
        return
    src = tmp_path / "src"
    src.mkdir()
    path = src / f"picture{case.suffix}"
    im.save(path, **case.save)
    with Image.open(path) as check:  # the file really holds the mode under test
        assert check.mode == (case.read_as or case.mode)
    m = preprocess(src, tmp_path / "out", resolution=SIDE)
    assert len(m.images) == 1 and not m.skipped
    with Image.open(tmp_path / "out" / m.images[0].file) as out:
        assert out.format == "PNG"
        assert_halves(out.convert("RGB") if out.mode != "RGB" else out, case)


def test_too_small_picture_is_refused_by_name_and_the_others_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(src / "good.png")
    Image.new("RGB", (8, 40), (10, 200, 10)).save(src / "edge.png")  # exactly the minimum (32 / 4) is kept
    Image.new("RGB", (7, 40), (10, 10, 200)).save(src / "tiny.png")
    m = preprocess(src, tmp_path / "out", resolution=32)
    kept = sorted(r.source.rsplit("/", 1)[1] for r in m.images)
    assert kept == ["edge.png", "good.png"]
    reasons = {s["source"].rsplit("/", 1)[1]: s["reason"] for s in m.skipped}
    assert set(reasons) == {"tiny.png"}
    assert "too small" in reasons["tiny.png"] and "7x40" in reasons["tiny.png"] and "8 pixels" in reasons["tiny.png"]
    assert "--resolution" in reasons["tiny.png"]  # says what to do
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["source"].rsplit("/", 1)[1] for s in saved["skipped"]] == ["tiny.png"]
    assert any("edge.png" in w for w in saved["warnings"])  # kept, but still warned about


def test_all_too_small_fails_naming_each_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(src / "thumb.jpg")
    Image.new("L", (100, 5), 9).save(src / "strip.png")
    out = tmp_path / "out"
    with pytest.raises(OnewordError) as e:
        preprocess(src, out, resolution=64)
    msg = str(e.value)
    assert "thumb.jpg" in msg and "10x10" in msg and "strip.png" in msg and "100x5" in msg
    assert "too small" in msg and "16 pixels" in e.value.hint
    assert not out.exists()
