"""SimpleNet's feature discriminator on the pretrained patch features: what it learns, that its training is seeded,
that the pretrained map sums it with the bank's distances on their validation scales, that it survives a checkpoint
round trip, and the stage's error when there are no validation images to scale it on."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from aead.models.backbones import build_backbone
from aead.training.checkpoint import load_pretrained_bank, save_pretrained_bank
from aead.data.mvtec import read_manifest, write_manifest
from aead.errors import DataError
from aead.data.corruption import corrupt_batch
from aead.models.memory_bank import build_pretrained_banks_and_save, part_scales, synthetic_defect_patches
from aead.params import parse_params
from aead.data.prepare import prepare_split
from aead.models.torch_model import FeatureDiscriminator, PretrainedPatchMemory
from aead.training.loops import train_feature_discriminator


def manifold(n: int, channels: int = 16, rank: int = 3, seed: int = 0) -> torch.Tensor:
    """``n`` features on a ``rank``-dimensional plane of ``channels``-dimensional space, with unequal scales."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, channels, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, rank, generator=gen) @ basis * 3.0 + 1.0


def train(patches: torch.Tensor, seed: int = 0) -> FeatureDiscriminator:
    model, stats = train_feature_discriminator(patches, hidden=32, steps=150, batch_size=600, noise=0.5, lr=2e-3,
                                               seed=seed, log=lambda m: None)
    assert stats.steps == 150 and np.isfinite(stats.final_loss)
    return model


def test_it_scores_features_off_the_training_manifold_above_those_on_it():
    model = train(manifold(4000))
    on = manifold(500, seed=1)
    off = on + torch.randn(on.shape, generator=torch.Generator().manual_seed(2)) * on.std(0)
    with torch.no_grad():
        scores = model(torch.cat([on, off]).T.reshape(1, 16, 1, 1000))[0, 0, 0]
    labels = np.r_[np.zeros(500), np.ones(500)]
    assert roc_auc_score(labels, scores.numpy()) > 0.95


def test_its_training_is_seeded_thread_count_independent_and_standardises_by_the_training_patches():
    patches = manifold(2000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = train(patches)
    finally:
        torch.set_num_threads(threads)
    a, c = train(patches), train(patches, seed=1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.out.weight, c.out.weight)
    assert torch.allclose(a.mean, patches.mean(0), atol=1e-5)
    assert torch.allclose(a.scale, patches.std(0), rtol=1e-5)


@pytest.fixture(scope="module")
def memory() -> PretrainedPatchMemory:
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0")
    mem = PretrainedPatchMemory(backbone, ("blocks.4", "blocks.10"), 3, 64, 152, 16, FeatureDiscriminator(152, 8))
    with torch.no_grad():
        mem.bank.normal_()
        mem.discriminator.out.weight.normal_()
    return mem.eval()


def test_the_map_is_the_sum_of_both_parts_on_their_validation_scales(memory):
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    val = (torch.rand(3, 48, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        scales = part_scales(memory, val, torch.device("cpu"), batch_size=2)
        memory.part_scales.copy_(scales)
        distances, disc = memory.part_maps(x)
        expected = (distances - scales[0, 0]) / scales[0, 1] + (disc - scales[1, 0]) / scales[1, 1]
        assert torch.allclose(memory.distance_map(x), expected, atol=1e-5)
        val_maps = memory.part_maps(torch.from_numpy(val).permute(0, 3, 1, 2).float() / 255.0)
    for (mean, scale), amap in zip(scales.tolist(), val_maps):
        assert mean == pytest.approx(amap.double().mean().item(), rel=1e-5)
        peak = (amap.flatten(1).amax(1).double().mean() - amap.double().mean()).item()
        assert scale == pytest.approx(peak, rel=1e-4)


def test_a_bank_with_a_discriminator_round_trips(memory, tmp_path):
    memory.part_scales.copy_(torch.tensor([[1.0, 2.0], [-3.0, 0.5]]))
    path = tmp_path / "bank.pt"
    save_pretrained_bank(path, memory, {"backbone": "efficientnet_lite0", "layers": list(memory.layers),
                                        "neighbourhood": 3, "shape": [48, 64]})
    loaded, meta = load_pretrained_bank(path)
    assert meta["discriminator"] == 8 and loaded.discriminator is not None
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.distance_map(x), memory.distance_map(x))


def test_a_bank_searched_in_two_stages_round_trips(memory, tmp_path):
    path = tmp_path / "bank.pt"
    memory.index_bank(16, 4)
    try:
        save_pretrained_bank(path, memory, {"backbone": "efficientnet_lite0", "layers": list(memory.layers),
                                            "neighbourhood": 3, "shape": [48, 64]})
        loaded, meta = load_pretrained_bank(path)
        assert (meta["search_dim"], meta["search_candidates"]) == (16, 4) and loaded.search_candidates == 4
        assert torch.equal(loaded.bank_projected, memory.bank_projected)
        x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            two_stage = loaded.distance_map(x)
            assert torch.equal(two_stage, memory.distance_map(x))
            memory.index_bank(16, 0)
            assert memory.bank_projected.shape == (64, 0)
            exact = memory.distance_map(x)
        assert torch.all(two_stage >= exact - 1e-4) and not torch.equal(two_stage, exact)
    finally:
        memory.index_bank(16, 0)


def test_the_stage_names_the_missing_validation_images(odd_dataset, raw_params, tmp_path):
    raw = copy.deepcopy(raw_params)
    raw["data"].update(root=str(odd_dataset), categories=["widget"], prepared_dir=str(tmp_path / "prepared"))
    raw["pretrained"].update(image_size=32, discriminator_steps=3)
    params = parse_params(raw)
    prepare_split(params.data, log=lambda m: None)
    val = read_manifest(tmp_path / "prepared", "val")
    write_manifest(tmp_path / "prepared", "val", [dataclasses.replace(s, category="other") for s in val])
    pattern = r"val\.csv: no validation images of category 'widget'.*discriminator_steps: 0.*brightness_sigma: 0"
    for steps, sigma in ((3, 16.0), (3, 0.0), (0, 16.0)):  # each part that needs the validation images
        raw["pretrained"].update(discriminator_steps=steps, brightness_sigma=sigma)
        with pytest.raises(DataError, match=pattern):
            build_pretrained_banks_and_save(parse_params(raw), tmp_path / "bank", log=lambda m: None)
        assert not (tmp_path / "bank").exists()
    raw["pretrained"].update(discriminator_steps=0, brightness_sigma=0.0)
    built = build_pretrained_banks_and_save(parse_params(raw), tmp_path / "bank", log=lambda m: None)
    assert "discriminator_seconds" not in built["categories"]["widget"]
    assert "brightness_seconds" not in built["categories"]["widget"]


def test_defect_patches_teach_it_what_the_noise_does_not():
    """Features on the training plane but beyond its usual extent are no noise-like departure from it: only a
    discriminator shown such defect patches scores them above the training features."""
    patches = manifold(4000)
    basis = torch.randn(3, 16, generator=torch.Generator().manual_seed(99))

    def far(n: int, seed: int) -> torch.Tensor:
        z = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
        z[:, 0] = 3.0 + 0.3 * z[:, 0]
        return z @ basis * 3.0 + 1.0

    plain = train(patches)
    taught, _ = train_feature_discriminator(patches, hidden=32, steps=150, batch_size=600, noise=0.5, lr=2e-3,
                                            seed=0, log=lambda m: None, defects=far(600, 3))
    on, off = manifold(500, seed=1), far(500, 4)
    labels = np.r_[np.zeros(500), np.ones(500)]
    with torch.no_grad():
        auroc = [roc_auc_score(labels, m(torch.cat([on, off]).T.reshape(1, 16, 1, 1000))[0, 0, 0].numpy())
                 for m in (plain, taught)]
    assert auroc[1] > 0.95 and auroc[1] > auroc[0] + 0.1, auroc


def test_synthetic_defect_patches_are_the_features_where_the_defect_covers_the_cell(memory):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    images.append(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))  # two working shapes
    cpu = torch.device("cpu")
    a = synthetic_defect_patches(memory, images, "mixed", seed=5, batch_size=2, device=cpu)
    b = synthetic_defect_patches(memory, images, "mixed", seed=5, batch_size=2, device=cpu)
    assert torch.equal(a, b) and a.shape[1] == 152 and a.shape[0] > 0
    gen = torch.Generator().manual_seed(5)
    expected = []
    for start in (0, 2):  # the batches: one shape each, two images at most
        batch = images[start:start + 2] if start == 0 else images[2:3]
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
        corrupted, mask = corrupt_batch(x, "mixed", gen, probability=1.0)
        with torch.no_grad():
            f = memory.features(corrupted)
        cover = torch.nn.functional.avg_pool2d(mask, 8)[:, 0]  # stride 8: the cells of a 64 x 96 image
        expected.append(f.permute(0, 2, 3, 1)[cover >= 0.5])
    assert torch.equal(a[: sum(e.shape[0] for e in expected)], torch.cat(expected))
    c = synthetic_defect_patches(memory, images, "mixed", seed=6, batch_size=2, device=cpu)
    assert not (c.shape == a.shape and torch.equal(c, a))
