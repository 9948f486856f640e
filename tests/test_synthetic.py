"""Tests for aead.data.synthetic: the embedded synthetic data set in MVTec AD layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aead.data import synthetic
from aead.errors import ParamsError
from aead.data.synthetic import CATEGORIES, generate_dataset

SIZE = 64
N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT = 3, 2, 2
ALL = list(CATEGORIES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    root = tmp_path_factory.mktemp("tiny") / "data"
    counts = generate_dataset(root, ALL, SIZE, N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT, seed=0)
    return root, counts


def test_categories_mapping() -> None:
    assert set(CATEGORIES) == {"bottle", "hazelnut", "cable", "tile"}
    for cat, defects in CATEGORIES.items():
        assert isinstance(defects, tuple) and len(defects) == 3, cat
        assert "good" not in defects
    assert CATEGORIES["cable"] == ("missing_wire", "cable_swap", "poke_insulation")


def test_layout_and_counts(tiny: tuple[Path, dict[str, dict[str, int]]]) -> None:
    root, counts = tiny
    assert list(counts) == ALL
    assert sorted(p.name for p in root.iterdir()) == sorted(ALL)
    for cat in ALL:
        expected = {"train_good": N_TRAIN, "test_good": N_TEST_GOOD, **{d: N_TEST_DEFECT for d in CATEGORIES[cat]}}
        assert counts[cat] == expected
        cdir = root / cat
        assert sorted(p.name for p in cdir.iterdir()) == ["ground_truth", "test", "train"]
        assert [p.name for p in (cdir / "train").iterdir()] == ["good"]
        assert sorted(p.name for p in (cdir / "test").iterdir()) == sorted(["good", *CATEGORIES[cat]])
        # good images have no masks
        assert sorted(p.name for p in (cdir / "ground_truth").iterdir()) == sorted(CATEGORIES[cat])
        train = sorted(p.name for p in (cdir / "train" / "good").iterdir())
        assert train == [f"{i:03d}.png" for i in range(N_TRAIN)]
        assert len(list((cdir / "test" / "good").iterdir())) == N_TEST_GOOD
        for sub in [cdir / "train" / "good", cdir / "test" / "good", *[cdir / "test" / d for d in CATEGORIES[cat]]]:
            for p in sub.iterdir():
                with Image.open(p) as im:
                    assert im.mode == "RGB" and im.size == (SIZE, SIZE), p
        for defect in CATEGORIES[cat]:
            images = sorted((cdir / "test" / defect).iterdir())
            masks = sorted((cdir / "ground_truth" / defect).iterdir())
            assert [p.stem + "_mask.png" for p in images] == [m.name for m in masks]
            assert len(images) == N_TEST_DEFECT
            for m in masks:
                with Image.open(m) as im:
                    assert im.mode == "L" and im.size == (SIZE, SIZE)
                    arr = np.asarray(im)
                assert set(np.unique(arr)) <= {0, 255}, m
                assert (arr == 255).any(), f"empty mask {m}"
                assert (arr == 255).mean() < 0.25, f"mask covers too much: {m}"


def test_same_seed_is_byte_identical(tiny: tuple[Path, dict[str, dict[str, int]]], tmp_path: Path) -> None:
    root, _ = tiny
    again = tmp_path / "again"
    generate_dataset(again, ALL, SIZE, N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT, seed=0)
    assert _files(again) == _files(root)


def test_other_seed_differs(tiny: tuple[Path, dict[str, dict[str, int]]], tmp_path: Path) -> None:
    root, _ = tiny
    other = tmp_path / "other"
    generate_dataset(other, ALL, SIZE, N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT, seed=1)
    a, b = _files(root), _files(other)
    assert a.keys() == b.keys()
    images = [k for k in a if not k.endswith("_mask.png")]
    assert all(a[k] != b[k] for k in images)


def test_output_independent_of_other_categories_and_counts(
    tiny: tuple[Path, dict[str, dict[str, int]]], tmp_path: Path
) -> None:
    root, _ = tiny
    only = tmp_path / "only"
    counts = generate_dataset(only, ["tile"], SIZE, N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT, seed=0)
    assert list(counts) == ["tile"]
    assert sorted(p.name for p in only.iterdir()) == ["tile"]
    assert _files(only / "tile") == _files(root / "tile")
    # fewer images per split: the first ones are the same
    fewer = tmp_path / "fewer"
    generate_dataset(fewer, ["cable", "bottle"], SIZE, 2, 1, 1, seed=0)
    for cat in ("cable", "bottle"):
        for rel, data in _files(fewer / cat).items():
            assert data == (root / cat / rel).read_bytes(), rel


def test_normal_images_vary(tiny: tuple[Path, dict[str, dict[str, int]]]) -> None:
    root, _ = tiny
    for cat in ALL:
        imgs = [_load(p).astype(np.float64) for p in sorted((root / cat / "train" / "good").iterdir())]
        imgs += [_load(p).astype(np.float64) for p in sorted((root / cat / "test" / "good").iterdir())]
        for i in range(len(imgs)):
            for j in range(i):
                assert np.abs(imgs[i] - imgs[j]).mean() > 3.0, (cat, i, j)
                # not just sensor noise: 8x8 block means differ too
                bi = imgs[i].reshape(SIZE // 8, 8, SIZE // 8, 8, 3).mean(axis=(1, 3))
                bj = imgs[j].reshape(SIZE // 8, 8, SIZE // 8, 8, 3).mean(axis=(1, 3))
                assert np.abs(bi - bj).mean() > 2.0, (cat, i, j)


def test_files_match_private_renderer(tiny: tuple[Path, dict[str, dict[str, int]]]) -> None:
    root, _ = tiny
    ci = synthetic._CATEGORY_INDEX["hazelnut"]
    normal, _, _ = synthetic._render("hazelnut", None, SIZE, np.random.default_rng([0, ci, 0, 1]))
    np.testing.assert_array_equal(normal, _load(root / "hazelnut" / "train" / "good" / "001.png"))
    k = CATEGORIES["hazelnut"].index("hole")
    _, defective, mask = synthetic._render("hazelnut", "hole", SIZE, np.random.default_rng([0, ci, 2 + k, 1]))
    np.testing.assert_array_equal(defective, _load(root / "hazelnut" / "test" / "hole" / "001.png"))
    np.testing.assert_array_equal(mask, _load(root / "hazelnut" / "ground_truth" / "hole" / "001_mask.png") == 255)


@pytest.mark.parametrize("category", ALL)
@pytest.mark.parametrize("size", [32, 128])
def test_defect_changes_exactly_the_masked_pixels(category: str, size: int) -> None:
    for defect in CATEGORIES[category]:
        for i in range(3):
            normal, defective, mask = synthetic._render(category, defect, size, np.random.default_rng([7, size, i]))
            assert defective is not None and mask is not None
            assert normal.shape == defective.shape == (size, size, 3) and normal.dtype == np.uint8
            assert mask.shape == (size, size) and mask.dtype == bool
            # the defect-free image is what the generator draws from the same stream without a defect
            plain, none_img, none_mask = synthetic._render(category, None, size, np.random.default_rng([7, size, i]))
            assert none_img is None and none_mask is None
            np.testing.assert_array_equal(plain, normal)
            assert mask.sum() >= 3, (category, defect, i)
            # outside the mask nothing changed, inside (nearly) every pixel did
            np.testing.assert_array_equal(defective[~mask], normal[~mask])
            changed = (defective[mask] != normal[mask]).any(axis=1)
            assert changed.mean() > 0.95, (category, defect, i, changed.mean())


def test_defects_vary_in_size_and_some_are_small() -> None:
    for category in ALL:
        ci = synthetic._CATEGORY_INDEX[category]
        for k, defect in enumerate(CATEGORIES[category]):
            areas = [
                synthetic._render(category, defect, 64, np.random.default_rng([0, ci, 2 + k, i]))[2].mean()
                for i in range(6)
            ]
            assert len({round(a, 5) for a in areas}) > 1, (category, defect)
    # the small, subtle defect types stay small
    for category, defect in [("bottle", "broken_small"), ("cable", "poke_insulation"), ("hazelnut", "crack")]:
        k = CATEGORIES[category].index(defect)
        ci = synthetic._CATEGORY_INDEX[category]
        for i in range(4):
            mask = synthetic._render(category, defect, 128, np.random.default_rng([0, ci, 2 + k, i]))[2]
            assert mask.mean() < 0.03, (category, defect, mask.mean())


_GOOD = dict(categories=["tile"], image_size=32, n_train=2, n_test_good=1, n_test_defect=1, seed=0)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"categories": ["tile", "carpet"]}, "categories"),
        ({"categories": []}, "categories"),
        ({"categories": "tile"}, "categories"),
        ({"categories": ["tile", "tile"]}, "categories"),
        ({"image_size": 100}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": -64}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"n_train": 1}, "n_train"),
        ({"n_train": "3"}, "n_train"),
        ({"n_test_good": 0}, "n_test_good"),
        ({"n_test_defect": 0}, "n_test_defect"),
        ({"n_test_defect": 1.5}, "n_test_defect"),
        ({"seed": -1}, "seed"),
        ({"seed": None}, "seed"),
    ],
)
def test_bad_arguments_raise_params_error(tmp_path: Path, override: dict, name: str) -> None:
    kwargs = {**_GOOD, **override}
    with pytest.raises(ParamsError, match=name):
        generate_dataset(tmp_path / "data", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unknown_category_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        generate_dataset(tmp_path / "data", **{**_GOOD, "categories": ["screw"]})
    msg = str(info.value)
    assert "screw" in msg
    for cat in ALL:
        assert cat in msg


def test_bad_root_raises(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="root"):
        generate_dataset(None, **_GOOD)  # type: ignore[arg-type]


def test_existing_root_is_replaced_and_no_temp_left(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "stale_dir").mkdir(parents=True)
    (root / "stale_dir" / "x.png").write_bytes(b"old")
    (root / "tile").mkdir()
    (root / "tile" / "junk.txt").write_text("old")
    generate_dataset(str(root), **_GOOD)  # a str root is fine too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in root.iterdir()) == ["tile"]
    assert not (root / "tile" / "junk.txt").exists()
    assert (root / "tile" / "train" / "good" / "001.png").is_file()


def test_failed_run_leaves_old_root_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "keep.txt").write_text("previous data set")
    real = synthetic._render
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # like a killed run
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_render", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(root, **_GOOD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in root.iterdir()) == ["keep.txt"]


def test_new_root_with_missing_parents_and_progress(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "data"
    seen: list[str] = []
    counts = generate_dataset(root, ["cable", "bottle"], 32, 2, 1, 1, seed=3, progress=seen.append)
    assert list(counts) == ["cable", "bottle"]
    assert len(seen) == 2 and seen[0].startswith("cable") and seen[1].startswith("bottle")
    assert sorted(p.name for p in root.parent.iterdir()) == ["data"]


def test_smallest_image_size_works(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_dataset(root, ALL, 8, 2, 1, 1, seed=0)
    assert sorted(p.name for p in (root / "tile" / "train" / "good").iterdir()) == ["000.png", "001.png"]
    with Image.open(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png") as im:
        assert im.size == (8, 8) and (np.asarray(im) == 255).any()
