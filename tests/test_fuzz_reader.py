"""Fuzz the image and mask reader: random bytes and random valid images give either a correct array or
our DataError, never another exception."""

from __future__ import annotations

import io as pyio
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aead.data.mvtec import read_image, read_mask
from aead.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".png", ".jpg", ".bmp"]),
       header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM"]))
def test_random_bytes_give_an_array_or_our_error(tmp_path_factory, data, suffix, header):
    path = Path(tmp_path_factory.mktemp("fuzz")) / f"x{suffix}"
    path.write_bytes(header + data)
    try:
        arr = read_image(path)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


@SETTINGS
@given(h=st.integers(1, 24), w=st.integers(1, 24), mode=st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1", "LA"]),
       fmt=st.sampled_from(["PNG", "BMP", "JPEG"]), seed=st.integers(0, 2**16), cut=st.floats(0.0, 1.0))
def test_valid_and_truncated_images(tmp_path_factory, h, w, mode, fmt, seed, cut):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = pyio.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this format cannot store this mode: nothing to read
        return
    raw = buf.getvalue()
    path = Path(tmp_path_factory.mktemp("fuzz")) / f"x.{fmt.lower()}"
    path.write_bytes(raw if cut > 0.9 else raw[: max(1, int(len(raw) * cut))])
    try:
        arr = read_image(path)
    except DataError:
        assert cut <= 0.9, "a complete, valid image must be readable"
        return
    assert arr.shape == (h, w, 3) and arr.dtype == np.uint8
    try:
        mask = read_mask(path, (h, w))
    except DataError:
        return
    assert mask.shape == (h, w) and mask.dtype == bool
