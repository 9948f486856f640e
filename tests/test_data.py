from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aead.data.mvtec import (RESIZE_BITS, read_image, read_mask, read_split, resize_batch, resize_image, resize_taps,
                             scan_category, split_train_val)
from aead.errors import DataError
from aead.params import DataParams
from aead.data.prepare import prepare_split
from conftest import save


def data_params(root: Path, out: Path, categories=("widget",), size=32) -> DataParams:
    return DataParams(root=str(root), categories=tuple(categories), image_size=size, val_fraction=0.25, seed=0,
                      prepared_dir=str(out))


def test_scan_finds_masks_and_unmasked_defects(odd_dataset):
    train, test = scan_category(odd_dataset, "widget")
    assert len(train) == 8
    assert {s.defect_type for s in test} == {"good", "scratch"}
    by_name = {Path(s.path).name: s for s in test}
    assert by_name["000.png"].label in (0, 1)
    assert by_name["002.png"].mask_path is None and by_name["002.png"].label == 1
    assert all(s.mask_path is None for s in test if s.label == 0)


def test_prepare_split_handles_real_world_formats(odd_dataset, tmp_path):
    metrics, rows = prepare_split(data_params(odd_dataset, tmp_path / "prep"), log=lambda m: None)
    c = metrics["categories"]["widget"]
    assert (c["train"], c["val"], c["test_good"], c["test_anomalous"], c["test_with_mask"]) == (6, 2, 2, 3, 2)
    test = read_split(tmp_path / "prep", "test")
    assert test.images.shape == (5, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.masks is not None and test.masks.shape == (5, 32, 32)
    masked = [i for i, s in enumerate(test.samples) if s.mask_path]
    for i in masked:  # a 10x10 square in a ~40-60 px image keeps a clear square after resizing
        assert 10 < test.masks[i].sum() < 60
    unmasked = [i for i, s in enumerate(test.samples) if s.label == 1 and not s.mask_path]
    assert test.masks[unmasked[0]].sum() == 0
    gray = read_split(tmp_path / "prep", "train").images[0]
    assert np.array_equal(gray[..., 0], gray[..., 1])
    assert {r["split"] for r in rows} >= {"train", "val", "test_good"}


def test_validation_comes_from_train_good_only(odd_dataset, tmp_path):
    prepare_split(data_params(odd_dataset, tmp_path / "prep"), log=lambda m: None)
    train = {s.path for s in read_split(tmp_path / "prep", "train").samples}
    val = {s.path for s in read_split(tmp_path / "prep", "val").samples}
    test = {s.path for s in read_split(tmp_path / "prep", "test").samples}
    assert not train & val and not (train | val) & test
    assert all("/train/good/" in p for p in val)


def test_split_is_seeded_and_independent_of_other_categories(odd_dataset):
    train, _ = scan_category(odd_dataset, "widget")
    a = split_train_val(train, 0.25, seed=1)
    assert a == split_train_val(train, 0.25, seed=1)
    assert a != split_train_val(train, 0.25, seed=2)


def test_sixteen_bit_palette_and_rgba_images(tmp_path):
    deep = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    arr = read_image(tmp_path / "deep.png")
    assert arr.shape == (16, 16, 3) and arr.max() == 255 and arr.min() == 0
    assert arr[0, 1, 0] == 1  # 257 of 65535 is 1 of 255
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    save(tmp_path / "rgba.png", rgba)
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (8, 8, 3)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"hello, not an image at all"])
def test_unreadable_images_name_the_file(tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(DataError, match="bad.png"):
        read_image(bad)


def test_truncated_png_is_an_error(tmp_path):
    good = save(tmp_path / "ok.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        read_image(tmp_path / "cut.png")


def test_mask_of_wrong_size_is_an_error(tmp_path):
    save(tmp_path / "m_mask.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"m_mask.png: mask is 12x10 pixels but its image is 16x16"):
        read_mask(tmp_path / "m_mask.png", (16, 16))


def test_layout_errors(odd_dataset, tmp_path):
    log = lambda m: None  # noqa: E731
    with pytest.raises(DataError, match="data.root"):
        prepare_split(data_params(tmp_path / "missing", tmp_path / "p"), log=log)
    with pytest.raises(DataError, match="category 'gizmo' not found.*widget"):
        prepare_split(data_params(odd_dataset, tmp_path / "p", categories=("gizmo",)), log=log)
    (odd_dataset / "widget" / "train" / "good" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        prepare_split(data_params(odd_dataset, tmp_path / "p"), log=log)
    assert not (tmp_path / "p").exists(), "nothing half-written"


def test_empty_train_good_and_orphan_mask(odd_dataset, tmp_path):
    for p in (odd_dataset / "widget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no training images"):
        scan_category(odd_dataset, "widget")


def test_mask_without_image(odd_dataset):
    (odd_dataset / "widget" / "test" / "scratch" / "000.png").unlink()
    with pytest.raises(DataError, match="000_mask.png: a mask without an image"):
        scan_category(odd_dataset, "widget")


def test_masks_named_like_their_images(odd_dataset):
    gt = odd_dataset / "widget" / "ground_truth" / "scratch"
    (gt / "001_mask.png").rename(gt / "001.png")  # one mask per naming rule in the same folder
    by_name = {Path(s.path).name: s for s in scan_category(odd_dataset, "widget")[1]}
    assert Path(by_name["000.png"].mask_path).name == "000_mask.png"
    assert Path(by_name["001.png"].mask_path).name == "001.png"
    assert by_name["002.png"].mask_path is None
    (gt / "001.png").rename(gt / "007.png")
    with pytest.raises(DataError, match=r"007.png: a mask without an image \(no .*scratch/007\.\*"):
        scan_category(odd_dataset, "widget")
    (gt / "007.png").rename(gt / "000.png")
    with pytest.raises(DataError, match=r"000_mask.png: a second mask for .*scratch/000\.\* \(the other is .*000.png\)"):
        scan_category(odd_dataset, "widget")


def test_bad_image_aborts_prepare_without_output(odd_dataset, tmp_path):
    (odd_dataset / "widget" / "test" / "good" / "001.png").write_bytes(b"garbage")
    params = data_params(odd_dataset, tmp_path / "prep")
    with pytest.raises(DataError, match="001.png"):
        prepare_split(params, log=lambda m: None)
    assert not (tmp_path / "prep").exists()
    assert not list(tmp_path.glob(".prep*")), "no temporary folder left behind"


def test_prepared_dir_is_replaced_whole(odd_dataset, tmp_path):
    out = tmp_path / "prep"
    out.mkdir()
    (out / "stale.npy").write_bytes(b"old")
    prepare_split(dataclasses.replace(data_params(odd_dataset, out)), log=lambda m: None)
    assert not (out / "stale.npy").exists()


def pillow_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def test_resize_is_pillows_bilinear_filter():
    """Along one axis (Pillow decides the order of the two passes itself), the resize is Pillow's BILINEAR filter up
    to the weights' fixed-point precision: never more than one level apart, on under 2 % of pixels; an unchanged
    size is the identity and a flat image stays flat."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (41, 67, 3), dtype=np.uint8)
    for height, width in ((41, 20), (41, 150), (13, 67), (90, 67), (41, 3)):
        ours = resize_image(image, (height, width)).astype(int)
        reference = pillow_resize(image, height, width).astype(int)
        assert ours.shape == reference.shape == (height, width, 3)
        assert np.abs(ours - reference).max() <= 1 and (ours != reference).mean() < 0.02, (height, width)
    assert resize_image(image, (41, 67)) is image
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    assert torch.equal(resize_batch(x, (41, 67)), x)
    flat = torch.full((2, 3, 33, 700), 173.0)
    assert torch.equal(resize_batch(flat, (64, 16)), torch.full((2, 3, 64, 16), 173.0))
    source, weight = resize_taps(700, 16)
    assert source.min() >= 0 and source.max() <= 699
    assert (weight.sum(1) - 2**RESIZE_BITS).abs().max() <= weight.shape[1]


def test_resize_gives_the_same_values_in_onnx_runtime(tmp_path):
    """Exported to ONNX for any batch and size, the resize computes exactly what it computes in PyTorch (exact
    arithmetic, no runtime's own Resize): downscaled, upscaled, a 16:1 strip, several images at once."""
    import onnxruntime as ort
    from torch.export import Dim

    class Resize(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return resize_batch(images.permute(0, 3, 1, 2).float(), (24, 40))

    example = torch.zeros((2, 37, 29, 3), dtype=torch.uint8)
    dims = {0: Dim("batch", min=1, max=64), 1: Dim("height", min=8, max=4096), 2: Dim("width", min=8, max=4096)}
    program = torch.export.export(Resize(), (example,), dynamic_shapes={"images": dims})
    torch.onnx.export(program, (example,), dynamo=True, opset_version=18, verbose=False).save(
        str(tmp_path / "resize.onnx"), external_data=False)
    session = ort.InferenceSession(str(tmp_path / "resize.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in ((1, 256, 256), (3, 50, 61), (1, 12, 15), (2, 32, 512), (1, 640, 40)):
        images = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        expected = Resize()(torch.from_numpy(images)).numpy()
        np.testing.assert_array_equal(session.run(None, {session.get_inputs()[0].name: images})[0], expected)
