"""load_image: every image kind becomes faithful 8-bit RGB, or a DataError naming the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dinov2.config.custom_hier import get_tree
from dinov2.data import check_manifest
from dinov2.data.datasets.dataloader_sup import load_image
from dinov2.errors import DataError

RAMP = (np.arange(16 * 16).reshape(16, 16) * 40 + 1000).astype(np.uint16)  # 1000 .. 11200 of 65535


def png_rgb16(path, pixels: np.ndarray):
    """A 16-bit RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def expected_stretch(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.rint((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_is_stretched_not_white(tmp_path, suffix):
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(RAMP).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(load_image(str(path)))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], expected_stretch(RAMP))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) == 256


def test_big_endian_16_bit_and_32_bit_integer_tiffs(tmp_path):
    Image.frombytes("I;16B", (16, 16), RAMP.astype(">u2").tobytes()).save(tmp_path / "be.tif")
    Image.fromarray(RAMP.astype(np.int32) * 1000 - 5_000_000).save(tmp_path / "i32.tif")
    for name in ("be.tif", "i32.tif"):
        np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / name)))[..., 1], expected_stretch(RAMP))


def test_float_tiff_is_stretched_and_nan_is_refused(tmp_path):
    values = np.linspace(-0.5, 2.0, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "float.tif")))[..., 2], expected_stretch(values))
    values[3, 3] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan.tif \(F\) has NaN or infinite pixel values"):
        load_image(str(tmp_path / "nan.tif"))


def test_a_constant_16_bit_image_is_black(tmp_path):
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "flat.png")
    assert np.asarray(load_image(str(tmp_path / "flat.png"))).max() == 0


def test_16_bit_rgb_keeps_its_colours(tmp_path):
    pixels = np.stack([RAMP * 5, RAMP * 2, np.full_like(RAMP, 65535)], axis=-1)
    rgb = np.asarray(load_image(str(png_rgb16(tmp_path / "rgb16.png", pixels))))
    np.testing.assert_array_equal(rgb, (pixels >> 8).astype(np.uint8))  # the upper 8 bits of each channel
    assert rgb[..., 0].max() > 200 and rgb[..., 1].max() < 100


def test_palette_la_and_rgba_images(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([255, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette_transparent.png")
    Image.new("LA", (4, 4), (90, 10)).save(tmp_path / "la.png")
    Image.new("RGBA", (4, 4), (1, 2, 3, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    expected = {
        "palette.png": (10, 200, 30),
        "palette_transparent.png": (10, 200, 30),
        "la.png": (90, 90, 90),
        "rgba.png": (1, 2, 3),  # alpha is dropped, the stored colour kept
        "cmyk.jpg": (255, 255, 255),
    }
    for name, colour in expected.items():
        image = load_image(str(tmp_path / name))
        assert image.mode == "RGB" and image.getpixel((2, 2)) == colour, name


def test_unknown_modes_and_stacks_are_refused_naming_the_file(tmp_path):
    Image.new("LAB", (4, 4)).save(tmp_path / "lab.tif")
    with pytest.raises(DataError, match=r"lab.tif has Pillow mode 'LAB', which the loader does not read"):
        load_image(str(tmp_path / "lab.tif"))
    frames = [Image.new("L", (4, 4), value) for value in (0, 50, 100)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"stack.tif holds 3 frames"):
        load_image(str(tmp_path / "stack.tif"))


def test_a_decompression_bomb_is_named_and_listed_by_check_manifest(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (40, 40)).save(tmp_path / "huge.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 1600 pixels > 2 x the limit
    with pytest.raises(DataError, match=r"huge.png is refused by Pillow's decompression-bomb guard"):
        load_image(str(tmp_path / "huge.png"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,dataset,split\nhuge.png,NGS,matek_2019,train\nsmall.png,NGS,matek_2019,train\n")
    bad_rows, counts, _ = check_manifest.check_manifests([str(manifest)], get_tree("v1"), workers=2)
    assert len(bad_rows) == 1 and "row 2" in bad_rows[0] and "decompression bomb" in bad_rows[0]
    assert counts["neutrophil_segmented"] == 1
