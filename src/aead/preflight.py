"""What a run needs that can be checked before any stage runs, so that a bad value stops ``dvc repro`` (or
``dvc exp run``) before DVC removes a single output: every params key valid, the pretrained backbone's weights
installed and intact, the launchers on the PATH, the ONNX exporter where ``export.formats`` asks for ONNX, and
the images of ``data.root`` in MVTec AD layout (unless
the pipeline generates them itself)."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
from pathlib import Path

from aead.models.backbones import check_backbone_weights
from aead.data.mvtec import scan_category
from aead.errors import ParamsError
from aead.params import Params, load_params

# what stage check-params writes when everything passes: always the same bytes, so that the stages that depend on
# it rerun only for their own params and code, never because the check ran again
PASSED = {"params": "passed"}


def check_launcher(params: Params) -> None:
    """The programs of ``model.launcher`` and ``pretrained.launcher`` can be found."""
    for key, launcher in (("model.launcher", params.model.launcher), ("pretrained.launcher", params.pretrained.launcher)):
        program = shlex.split(launcher)[0]
        if shutil.which(program) is None:
            raise ParamsError(f"{params.source}: {key}: {program!r} is not on the PATH (from {launcher!r})")


def check_onnx_exporter(params: Params) -> None:
    """Where ``export.formats`` holds ``onnx``: torch's ONNX exporter can run (it needs ``onnxscript`` and ``onnx``)."""
    if "onnx" not in params.export.formats:
        return
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ParamsError(f"{params.source}: export.formats: onnx needs the packages {', '.join(missing)}, not "
                          "installed; pip install -r requirements.txt, or drop onnx from export.formats")


def check_data_root(params: Params) -> None:
    """Every category of ``data.categories`` is under ``data.root`` in MVTec AD layout (files listed, not decoded;
    prepare-split decodes them). The synthetic set is not checked: the synthesize stage writes it."""
    root = Path(params.data.root)
    if root.resolve() == Path(params.synthetic.root).resolve():
        return
    if not root.is_dir():
        raise ParamsError(f"{params.source}: data.root: {root} is not a folder (expected <category>/train/good and "
                          "<category>/test/<defect type> in it)")
    for category in params.data.categories:
        scan_category(root, category)


def preflight(params_path: str | Path) -> Params:
    """The params of ``params_path``, validated, with what they name checked to exist."""
    params = load_params(params_path)
    check_backbone_weights(params.pretrained.backbone)
    check_launcher(params)
    check_onnx_exporter(params)
    check_data_root(params)
    return params
