"""Preprocessing (timm eval transform in NumPy), labelled-folder listing, batching."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from onnxquant.errors import UserError
from onnxquant.images import (IMAGENET_MEAN, Preprocess, default_preprocess, fit_width,
                              for_input, iter_batches, list_images, list_labelled, load_image,
                              pad_line, take_evenly, wnid_to_index)

PLAIN = dict(mean=(0, 0, 0), std=(1, 1, 1))


def _noise_image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=0), "input_size"),
    (dict(input_size=8, crop_pct=0.0), "crop_pct"),
    (dict(input_size=8, crop_pct=1.2), "crop_pct"),
    (dict(input_size=8, interpolation="lanczos"), "interpolation"),
    (dict(input_size=8, mean=(0.5, 0.5)), "mean"),
    (dict(input_size=8, std=(1.0, 0.0, 1.0)), "std"),
])
def test_preprocess_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)


def test_preprocess_from_reference_json(tmp_path):
    cfg = {"input_size": [3, 128, 128], "interpolation": "bicubic", "crop_pct": 0.9,
           "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"model": "m", "eval_preprocessing": cfg}))
    pre = Preprocess.from_json(path)
    assert pre == Preprocess(128, 0.9, "bicubic", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert pre.resize_size == 142  # floor(128 / 0.9)


def test_preprocess_from_json_rejects_non_square(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"input_size": [3, 128, 96]}))
    with pytest.raises(ValueError, match="square"):
        Preprocess.from_json(path)


def test_load_image_without_resize_crops_like_torchvision(tmp_path):
    # 20x10, shorter side 10 == floor(8 / 0.8): no resize; crop top=round(1.0), left=round(6.0)
    pixels = _noise_image(tmp_path / "a.png", 20, 10)
    x = load_image(tmp_path / "a.png", Preprocess(8, crop_pct=0.8, **PLAIN))
    expected = pixels[1:9, 6:14].transpose(2, 0, 1).astype(np.float32) / 255
    assert x.dtype == np.float32 and x.shape == (3, 8, 8)
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("height, top", [(9, 0), (11, 2), (13, 2)])  # round half to even
def test_center_crop_rounds_half_to_even(tmp_path, height, top):
    pixels = _noise_image(tmp_path / "a.png", 8, height)
    # crop_pct=1: shorter side 8 stays 8 (the width), so only the vertical crop moves
    x = load_image(tmp_path / "a.png", Preprocess(8, crop_pct=1.0, **PLAIN))
    np.testing.assert_array_equal(x * 255, pixels[top:top + 8].transpose(2, 0, 1))


def test_load_image_resizes_shorter_side_with_truncated_long_side(tmp_path):
    _noise_image(tmp_path / "a.png", 33, 20)
    pre = Preprocess(8, crop_pct=0.5, interpolation="bilinear", **PLAIN)  # shorter side -> 16
    with Image.open(tmp_path / "a.png") as img:
        resized = np.asarray(img.resize((26, 16), Image.BILINEAR))  # int(16 * 33 / 20) = 26
    x = load_image(tmp_path / "a.png", pre)
    np.testing.assert_array_equal(x * 255, resized[4:12, 9:17].transpose(2, 0, 1))


def test_load_image_normalizes_and_converts_grayscale(tmp_path):
    Image.new("L", (8, 8), 255).save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", Preprocess(8, crop_pct=1.0))
    expected = (1 - np.array(IMAGENET_MEAN, np.float32)) / np.array((0.229, 0.224, 0.225),
                                                                     np.float32)
    np.testing.assert_allclose(x[:, 0, 0], expected, rtol=1e-6)


def test_load_image_names_unreadable_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg", Preprocess(8))


@pytest.mark.torch
def test_load_image_matches_timm_transform(tmp_path):
    timm = pytest.importorskip("timm")
    for i, (w, h) in enumerate([(37, 23), (23, 37), (50, 50), (161, 97)]):
        _noise_image(tmp_path / f"{i}.jpg", w, h, seed=i)
    for cfg in [dict(input_size=(3, 16, 16), crop_pct=0.9, interpolation="bicubic"),
                dict(input_size=(3, 21, 21), crop_pct=0.875, interpolation="bilinear")]:
        transform = timm.data.create_transform(**cfg)
        pre = Preprocess.from_dict(cfg)
        for path in sorted(tmp_path.glob("*.jpg")):
            with Image.open(path) as img:
                ref = transform(img.convert("RGB")).numpy()
            np.testing.assert_array_equal(load_image(path, pre), ref)


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for name in ["b/2.JPG", "a/1.png", "c.jpeg", "d.WebP", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/1.png", "b/2.JPG", "c.jpeg", "d.WebP"]


def test_list_images_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path)


def test_take_evenly_spreads_over_the_list():
    items = list(range(10))
    assert take_evenly(items, 5) == [1, 3, 5, 7, 9]
    assert take_evenly(items, 2) == [2, 7]
    assert take_evenly(items, 0) == []
    assert take_evenly(items, 20) == items
    assert take_evenly(items, None) == items


def _tsv(path, rows, header="path\tclass_index"):
    path.write_text("\n".join([header] + ["\t".join(map(str, r)) for r in rows]) + "\n")


def test_list_labelled_subfolder_uses_parent_labels_tsv(tmp_path):
    for name in ["val/x/1.JPEG", "val/x/2.JPEG", "train/x/3.JPEG"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    _tsv(tmp_path / "labels.tsv", [("train/x/3.JPEG", 5), ("val/x/2.JPEG", 7), ("val/x/1.JPEG", 7)])
    items = list_labelled(tmp_path / "val")
    assert [(p.name, c) for p, c in items] == [("1.JPEG", 7), ("2.JPEG", 7)]
    assert len(list_labelled(tmp_path)) == 3


def test_list_labelled_wnid_folders(tmp_path):
    wnids = wnid_to_index()
    assert wnids["n01440764"] == 0 and wnids["n03888257"] == 701 and len(wnids) == 1000
    for name in ["n03888257/b.JPEG", "n01440764/a.JPEG", "other/c.JPEG"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    items = list_labelled(tmp_path)
    assert [(p.name, c) for p, c in items] == [("a.JPEG", 0), ("b.JPEG", 701)]


def test_list_labelled_flat_folder_with_explicit_tsv(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ["b.png", "a.png"]:
        (tmp_path / "imgs" / name).write_bytes(b"")
    _tsv(tmp_path / "my_labels.tsv", [("b.png", "n01443537"), ("a.png", "n01440764")],
         header="path\twnid")
    items = list_labelled(tmp_path / "imgs", tmp_path / "my_labels.tsv")
    assert [(p.name, c) for p, c in items] == [("a.png", 0), ("b.png", 1)]


def test_list_labelled_user_errors(tmp_path):
    with pytest.raises(UserError, match="no labelled images"):
        list_labelled(tmp_path)
    _tsv(tmp_path / "labels.tsv", [("missing.png", 3)])
    with pytest.raises(UserError, match="missing"):
        list_labelled(tmp_path)
    _tsv(tmp_path / "labels.tsv", [("a.png", 3)], header="file\tlabel")
    with pytest.raises(UserError, match="columns"):
        list_labelled(tmp_path)


def test_iter_batches_keeps_order_and_shapes(tmp_path):
    paths = []
    for i in range(5):
        Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    batches = list(iter_batches(paths, Preprocess(8, crop_pct=1.0, **PLAIN), batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert all(b.dtype == np.float32 for b in batches)
    red = np.concatenate(batches)[:, 0, 0, 0] * 255
    np.testing.assert_allclose(red, [0, 40, 80, 120, 160], atol=1e-4)


# ---- inputs that are not square: text lines ("pad"), "stretch", BGR ----------------------

LINE = dict(interpolation="bilinear", **PLAIN)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=8, resize="letterbox"), "resize"),
    (dict(input_size=8, channel_order="gbr"), "channel_order"),
    (dict(input_size=8, resize="pad", width=0), "width"),
    (dict(input_size=8, width=16), "crop"),  # a center crop is square
    (dict(input_size=8, resize="stretch"), "width"),
])
def test_preprocess_rejects_bad_line_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)


def test_pad_keeps_the_aspect_and_zero_pads_on_the_right(tmp_path):
    _noise_image(tmp_path / "a.png", 20, 10)  # at height 8: ceil(8 * 20 / 10) = 16 px
    x = load_image(tmp_path / "a.png", Preprocess(8, resize="pad", width=24, **LINE))
    with Image.open(tmp_path / "a.png") as img:
        resized = np.asarray(img.resize((16, 8), Image.BILINEAR), np.float32)
    assert x.shape == (3, 8, 24) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :, :16] * 255, resized.transpose(2, 0, 1))
    assert not x[:, :, 16:].any()


def test_pad_squeezes_lines_wider_than_the_width(tmp_path):
    _noise_image(tmp_path / "a.png", 50, 10)  # 40 px at height 8, squeezed into 24
    x = load_image(tmp_path / "a.png", Preprocess(8, resize="pad", width=24, **LINE))
    with Image.open(tmp_path / "a.png") as img:
        resized = np.asarray(img.resize((24, 8), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(x * 255, resized.transpose(2, 0, 1))


def test_stretch_ignores_the_aspect(tmp_path):
    _noise_image(tmp_path / "a.png", 11, 30)
    x = load_image(tmp_path / "a.png", Preprocess(8, resize="stretch", width=20, **LINE))
    with Image.open(tmp_path / "a.png") as img:
        resized = np.asarray(img.resize((20, 8), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(x * 255, resized.transpose(2, 0, 1))


def test_bgr_reverses_channels_and_normalizes_in_the_model_order(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 51)).save(tmp_path / "c.png")
    pre = Preprocess(8, crop_pct=1.0, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0),
                     channel_order="bgr")
    x = load_image(tmp_path / "c.png", pre)
    expected = (np.array([0.2, 0.0, 1.0], np.float32) - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]
    np.testing.assert_allclose(x[:, 3, 3], expected, rtol=1e-6)


def test_fit_width_is_the_median_line_width_at_the_height(tmp_path):
    for i, (w, h) in enumerate([(20, 10), (33, 10), (7, 14), (50, 10)]):  # 16, 27, 4, 40
        _noise_image(tmp_path / f"{i}.png", w, h)
    paths = sorted(tmp_path.glob("*.png"))
    assert fit_width(paths, Preprocess(8, resize="pad")).width == 22  # ceil((16 + 27) / 2)
    assert fit_width(paths[:3], Preprocess(8, resize="pad")).width == 16
    assert fit_width(paths, Preprocess(8, resize="pad", width=5)).width == 5  # given: kept
    assert fit_width(paths, Preprocess(8)).width is None  # a crop has no width


def test_fit_width_names_an_unreadable_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        fit_width([tmp_path / "bad.png"], Preprocess(8, resize="pad"))


@pytest.mark.parametrize("height, width, expected", [
    (224, 224, Preprocess(224)),
    (None, None, Preprocess(224)),
    (None, 96, Preprocess(96)),
    (48, None, Preprocess(48, resize="pad")),
    (48, 320, Preprocess(48, resize="pad", width=320)),
])
def test_default_preprocess_pads_inputs_that_are_not_square(height, width, expected):
    assert default_preprocess(height, width) == expected


def test_for_input_fills_in_the_model_width_only_where_missing():
    assert for_input(Preprocess(8, resize="pad"), 8, 40).width == 40
    assert for_input(Preprocess(8, resize="pad", width=30), 8, 40).width == 30
    assert for_input(Preprocess(8, resize="pad"), 8, None).width is None
    assert for_input(Preprocess(8), 8, 8).width is None


def test_preprocess_from_json_with_a_line_resize(tmp_path):
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"input_size": [3, 48, 320], "resize": "pad",
                                "channel_order": "bgr", "mean": [0.5] * 3, "std": [0.5] * 3}))
    pre = Preprocess.from_json(path)
    assert (pre.input_size, pre.width, pre.resize, pre.channel_order) == (48, 320, "pad", "bgr")


def test_gray_is_luma_before_resizing_with_one_mean_and_std(tmp_path):
    _noise_image(tmp_path / "a.png", 20, 10)
    pre = Preprocess(8, resize="pad", width=24, interpolation="bilinear", mean=(0.25,),
                     std=(0.5,), channel_order="gray")
    x = load_image(tmp_path / "a.png", pre)
    with Image.open(tmp_path / "a.png") as img:
        luma = np.asarray(img.convert("L").resize((16, 8), Image.BILINEAR), np.float32)
    assert x.shape == (1, 8, 24)
    np.testing.assert_allclose(x[0, :, :16], (luma / 255 - 0.25) / 0.5, rtol=1e-6, atol=1e-6)
    assert not x[:, :, 16:].any()
    with pytest.raises(ValueError, match="mean needs 1 value"):
        Preprocess(8, channel_order="gray")  # ImageNet's three values do not fit one channel


def test_default_preprocess_of_a_one_channel_input_is_gray():
    assert default_preprocess(32, None, 1) == Preprocess(32, resize="pad", channel_order="gray",
                                                         mean=(0.5,), std=(0.5,))
    assert default_preprocess(28, 28, 1).channel_order == "gray"


def test_for_input_refuses_a_channel_count_the_model_does_not_take():
    with pytest.raises(UserError, match="--channel-order gray"):
        for_input(Preprocess(8), 8, 8, channels=1)
    assert for_input(Preprocess(8), 8, 8, channels=3) == Preprocess(8)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 60), h=st.integers(1, 60), height=st.integers(1, 12),
       width=st.integers(1, 40), gray=st.booleans())
def test_pad_line_shape_and_padding_for_any_size(w, h, height, width, gray):
    """Any line: C x height x width; the first min(width, ceil(height * w / h)) columns hold
    the image (white here: (1 - 0.5) / 0.5 = 1), the rest are zeros."""
    order, norm = ("gray", (0.5,)) if gray else ("bgr", (0.5,) * 3)
    pre = Preprocess(height, resize="pad", width=width, mean=norm, std=norm,
                     channel_order=order)
    x = pad_line(Image.new("RGB", (w, h), (255, 255, 255)), pre)
    kept = min(width, -(-height * w // h))
    assert x.shape == (1 if gray else 3, height, width) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, :, :kept], 1.0, atol=1e-6)
    assert not x[:, :, kept:].any()
