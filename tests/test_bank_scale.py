"""The pretrained bank built as a stream and across processes (issue 31, item 2): the merge-and-reduce coreset holds
at most the bank and one chunk, is deterministic, equals the one-pass coreset when everything is one chunk, and draws
the same uniform samples however the images are chunked; the real stage under torchrun with 2 gloo processes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from aead.data.prepare import prepare_split
from aead.data.synthetic import generate_dataset
from aead.errors import DataError
from aead.models.memory_bank import CoresetStream, select_coreset, stream_bank, uniform_positions
from aead.params import parse_params
from aead.training.checkpoint import load_pretrained_bank
from aead.training.distributed import DistContext

CPU = torch.device("cpu")
WEIGHTS = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(7))


def extract(x: torch.Tensor) -> torch.Tensor:
    """A fixed 40-channel feature map (stride 4) of an image batch: more channels than the greedy's projection, and
    each image's features independent of the others in its batch."""
    return torch.nn.functional.conv2d(x, WEIGHTS, stride=4)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def all_patches(train: np.ndarray, batch: int = 4) -> torch.Tensor:
    """Every patch's features, extracted in batches of ``batch`` images as :func:`stream` does (a convolution's last
    bits may depend on the batch it runs in)."""
    parts = []
    for s in range(0, len(train), batch):
        f = extract(torch.from_numpy(train[s : s + batch]).permute(0, 3, 1, 2).float() / 255)
        parts.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
    return torch.cat(parts)


def stream(train: np.ndarray, chunk: int, method: str = "greedy", sample: int | None = None, ratio: float = 0.1,
           batch: int = 4):
    streamed = stream_bank(extract, lambda a, b: train[a:b], len(train), method, ratio, 1000, 3, sample, chunk, batch,
                           CPU)
    assert streamed is not None
    return streamed


def test_one_chunk_is_the_one_pass_coreset_and_the_sample_is_every_patch_in_order():
    train = images(12)
    feats = all_patches(train)
    streamed = stream(train, chunk=12)
    assert torch.allclose(streamed.bank, feats[select_coreset(feats, "greedy", 0.1, 1000, 3)], atol=1e-6)
    torch.testing.assert_close(streamed.sample, feats, rtol=1e-5, atol=1e-5)
    assert streamed.stats.patches == feats.shape[0] == 12 * 16 and streamed.stats.bank_size == 19


def clustered(n: int) -> np.ndarray:
    """``n`` images of ``n // 2`` colours (each image a colour with a little noise, two images per colour in turn), so
    the patches form clusters that reach late images."""
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 200, size=(n // 2, 1, 1, 3))
    noise = rng.integers(0, 20, size=(n, 16, 16, 3))
    return (palette.repeat(2, axis=0) + noise).astype(np.uint8)


def test_chunks_are_deterministic_and_cover_every_cluster():
    train = clustered(40)
    feats = all_patches(train)
    whole, chunked = stream(train, chunk=40), stream(train, chunk=8)
    assert torch.equal(chunked.bank, stream(train, chunk=8).bank)
    assert chunked.bank.shape == whole.bank.shape and not torch.equal(chunked.bank, whole.bank)

    def radius(bank: torch.Tensor) -> float:
        return float(torch.cdist(feats, bank).min(1).values.max())

    first = radius(feats[: whole.stats.bank_size])  # a bank of as many patches that misses the later clusters
    assert radius(whole.bank) < 0.25 * first and radius(chunked.bank) < 0.25 * first


def test_the_stream_never_holds_more_than_the_bank_and_one_chunk():
    train = images(30)
    s = CoresetStream("greedy", 0.1, 1000, 0, None, total_images=30, first_image=0, stop_image=30, chunk_images=7)
    for first in range(0, 30, 7):
        batch = train[first : first + 7]
        s.add(all_patches(batch), len(batch), first)
        assert s.filled <= s.bank_size + 7 * 16
        s.reduce()
        assert s.filled == min(s.bank_size, (first + len(batch)) * 16)
    assert s.buffer.shape[0] == s.bank_size + 7 * 16 == 48 + 112
    with pytest.raises(RuntimeError, match="more than chunk_images=7 images"):
        s.add(all_patches(train[:8]), 8, 0)


def test_random_draws_do_not_depend_on_the_chunks():
    train = images(20)
    feats = all_patches(train)
    a, b = stream(train, chunk=20, method="random", sample=50), stream(train, chunk=6, method="random", sample=50)
    assert torch.equal(a.bank, b.bank) and torch.equal(a.sample, b.sample)
    assert a.sample.shape[0] == 50 and a.bank.shape[0] == 32
    picked = uniform_positions(feats.shape[0], 50, 3 + 1)
    assert picked is not None and len(set(picked.tolist())) == 50
    assert torch.allclose(a.sample, feats[torch.from_numpy(picked)], atol=1e-6)
    assert uniform_positions(10, 10, 0) is None


def test_more_processes_than_images_is_refused():
    with pytest.raises(DataError, match="1 training images for 2 processes"):
        stream_bank(extract, lambda a, b: images(1)[a:b], 1, "greedy", 0.1, 1000, 0, None, 4, 4, CPU,
                    DistContext(rank=0, world_size=2))


@pytest.fixture(scope="module")
def project(tmp_path_factory, raw_params_module):
    work = tmp_path_factory.mktemp("bank-scale")
    generate_dataset(work / "data", ["bottle"], 32, n_train=14, n_test_good=1, n_test_defect=1, seed=0)
    raw = copy.deepcopy(raw_params_module)
    raw["data"].update(root=str(work / "data"), categories=["bottle"], image_size=32, val_fraction=0.2,
                       prepared_dir=str(work / "prepared"))
    raw["model"]["num_threads"] = 1
    raw["pretrained"].update(backbone="efficientnet_lite0", layers=["blocks.4", "blocks.10"], image_size=32,
                             border_padding=0, coreset_ratio=0.25, discriminator_steps=5, chunk_images=3)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    prepare_split(parse_params(raw).data, log=lambda m: None)
    return work


def run_stage(work, repo_root, tag: str, processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = launcher + [str(repo_root / "stages" / "build_pretrained_bank.py"), "--params", str(work / "params.yaml"),
                      "--out", str(work / f"bank-{tag}"), "--metrics-dir", str(work / f"metrics-{tag}"),
                      "--plot", str(work / f"{tag}.csv")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=work,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_stage_under_torchrun_merges_the_processes_banks(project, repo_root):
    one, two = run_stage(project, repo_root, "one", 1), run_stage(project, repo_root, "two", 2)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    metrics = {tag: json.loads((project / f"metrics-{tag}" / "details" / "pretrained-bank.json").read_text())
               for tag in ("one", "two")}
    assert metrics["one"]["processes"] == 1 and metrics["two"]["processes"] == 2
    a, b = metrics["one"]["categories"]["bottle"], metrics["two"]["categories"]["bottle"]
    assert a["images"] == b["images"] == 11 and a["patches"] == b["patches"] == 11 * 16
    assert a["bank_size"] == b["bank_size"] == 44 and "part_scales" in b
    log = two.stdout + two.stderr
    assert log.count("feature discriminator on 176 of the training patches") == 1, "only the main process logs"
    mem1, _ = load_pretrained_bank(project / "bank-one" / "bottle.pt")
    mem2, meta = load_pretrained_bank(project / "bank-two" / "bottle.pt")
    assert mem2.discriminator is not None and meta["bank_size"] == 44
    assert not torch.equal(mem1.bank, mem2.bank), "the merged bank is another coreset of the same patches"
    assert sorted(p.name for p in (project / "bank-two").iterdir()) == ["bottle.pt"]
