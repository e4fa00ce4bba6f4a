"""Preprocessing against timm's own eval transform (``create_transform(**resolve_data_config(...))``).

timm and torchvision are the oracle here only (the package does the arithmetic itself); the comparison is
on the final normalised tensor, which must be equal bit for bit.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nextvit_deploy.data import SKIMAGE_PHOTOS, iter_image_dir, open_rgb
from nextvit_deploy.errors import BadInput
from nextvit_deploy.preprocess import (
    MAX_ASPECT,
    crop_box,
    normalize_chw,
    preprocess_pil,
    resized_size,
    to_rgb,
)
from nextvit_model import VARIANTS, resolve_variant

from conftest import requires

pytestmark = requires("timm")


def _timm_transform(variant: str, **override):
    import timm.data
    from timm.models import get_pretrained_cfg

    cfg = timm.data.resolve_data_config(pretrained_cfg=get_pretrained_cfg(f"{variant}.bd_in1k").to_dict())
    cfg.update(override)
    return timm.data.create_transform(**cfg), cfg


def _ours(image, variant: str, **override) -> np.ndarray:
    cfg = resolve_variant(variant)
    size = override.get("input_size", (3, *cfg.input_size))[1:]
    chw = preprocess_pil(image, size, crop_pct=override.get("crop_pct", cfg.crop_pct),
                         interpolation=override.get("interpolation", cfg.interpolation))
    return normalize_chw(chw, cfg.mean, cfg.std)


def _assert_same(image, variant="nextvit_small", **override):
    transform, _ = _timm_transform(variant, **override)
    want = transform(to_rgb(image)).numpy()
    got = _ours(image, variant, **override)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_config_is_timms(variant):
    _, cfg = _timm_transform(variant)
    ours = resolve_variant(variant)
    assert tuple(cfg["input_size"][1:]) == ours.input_size
    assert cfg["crop_pct"] == ours.crop_pct and cfg["interpolation"] == ours.interpolation
    assert tuple(cfg["mean"]) == ours.mean and tuple(cfg["std"]) == ours.std
    assert cfg.get("crop_mode", "center") == "center"


@pytest.mark.parametrize("name", SKIMAGE_PHOTOS)
def test_bundled_photos_match_timm_bit_for_bit(name):
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    _assert_same(Image.fromarray(arr))


@pytest.mark.parametrize("wh", [(1000, 20), (20, 1000), (235, 235), (236, 235), (237, 1001), (224, 224), (17, 19),
                                (640, 480), (481, 640)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_aspect_ratios_and_odd_sizes_match_timm(wh, interpolation):
    rng = np.random.default_rng(wh[0] * 7 + wh[1])
    image = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    _assert_same(image, interpolation=interpolation)


@pytest.mark.parametrize("crop_pct,size", [(0.875, (3, 224, 224)), (1.0, (3, 64, 64)), (0.95, (3, 96, 160)),
                                           (0.9, (3, 160, 96))])
def test_other_crop_pcts_and_non_square_sizes_match_timm(crop_pct, size):
    rng = np.random.default_rng(5)
    for w, h in [(300, 200), (200, 300), (97, 401)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _assert_same(image, crop_pct=crop_pct, input_size=size)


def test_resize_arithmetic_is_torchvisions():
    # torchvision truncates the long side (int()), and centre-crop rounds half to even
    assert resized_size(1000, 20, 224, 0.95) == (11750, 235)
    assert resized_size(20, 1000, 224, 0.95) == (235, 11750)
    assert resized_size(333, 500, 224, 0.95) == (235, int(235 * 500 / 333))
    assert crop_box(235, 235, 224) == (6, 6, 230, 230)  # (235-224)/2 = 5.5 -> 6
    assert crop_box(237, 300, 224) == (6, 38, 230, 262)  # 6.5 -> 6, 38


def _encode(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _photo() -> np.ndarray:
    import skimage.data

    return np.asarray(skimage.data.chelsea())  # 300x451 RGB


def test_grey_palette_and_cmyk_are_timms_loader_conversion():
    rgb = Image.fromarray(_photo())
    kinds = {"L": _encode(rgb.convert("L"), "PNG"),
             "P": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
             "CMYK": _encode(rgb.convert("CMYK"), "JPEG", quality=95)}
    transform, _ = _timm_transform("nextvit_small")
    for mode, image in kinds.items():
        assert image.mode == mode
        want = transform(image.convert("RGB")).numpy()  # timm's ImageDataset: Image.open(f).convert("RGB")
        assert np.array_equal(_ours(image, "nextvit_small"), want), mode


def test_sixteen_bit_png_is_scaled_not_clipped():
    grey8 = np.asarray(Image.fromarray(_photo()).convert("L"))
    image = _encode(Image.fromarray(grey8.astype(np.uint16) * 257), "PNG")
    assert image.mode.startswith("I")
    rgb = to_rgb(image)
    assert np.array_equal(np.asarray(rgb), np.stack([grey8] * 3, axis=-1))  # x*257/65535*255 = x exactly
    _assert_same(image)
    # PIL's own convert("RGB") clips 16-bit values to 255: a nearly white picture. Ours keeps the picture.
    assert np.asarray(rgb).std() > 20


def test_rgba_and_transparent_palette_composite_on_white():
    arr = _photo()
    alpha = np.zeros(arr.shape[:2], np.uint8)
    alpha[:, arr.shape[1] // 2:] = 255
    rgba = _encode(Image.fromarray(np.dstack([arr, alpha]), "RGBA"), "PNG")
    rgb = np.asarray(to_rgb(rgba))
    assert (rgb[:, : arr.shape[1] // 2] == 255).all()  # fully transparent -> white
    assert np.array_equal(rgb[:, arr.shape[1] // 2:], arr[:, arr.shape[1] // 2:])  # opaque -> unchanged
    _assert_same(rgba)
    pal = Image.new("P", (50, 40), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(1, (25, 0, 50, 40))
    pal.info["transparency"] = 0
    pal = _encode(pal, "PNG")
    out = np.asarray(to_rgb(pal))
    assert (out[:, :25] == 255).all() and (out[:, 25:] == (200, 10, 10)).all()


def test_files_of_every_mode_stream_through_the_folder_reader(tmp_path):
    rgb = Image.fromarray(_photo())
    rgb.convert("L").save(tmp_path / "grey.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(tmp_path / "deep.png")
    stream = iter_image_dir(tmp_path, 64)
    got = {p.name: image for image, p in stream}
    assert not stream.skipped and len(got) == 5
    for name, image in got.items():
        assert np.array_equal(image, preprocess_pil(open_rgb(tmp_path / name), 64)), name
    assert np.array_equal(got["grey.png"], got["deep.png"])  # 16-bit is the 8-bit picture scaled by 257


def test_absurd_aspect_ratio_is_one_clear_error(tmp_path):
    strip = Image.new("RGB", (int(MAX_ASPECT * 10) + 10, 10))
    with pytest.raises(BadInput, match=r"aspect ratio beyond 64:1: crop it"):
        preprocess_pil(strip, 224)
    strip.save(tmp_path / "strip.png")
    with pytest.raises(BadInput, match="strip.png cannot be used .*aspect ratio beyond 64:1"):
        open_rgb(tmp_path / "strip.png")
