"""The pretrained map's stages on one real MVTec-layout category, under the committed params with some keys set, one
run per setting, side by side: prepare-split, build-pretrained-bank and evaluate-pretrained as stage scripts in a
scratch folder (the code and params ``dvc exp run -S data.root=… -S 'data.categories=[…]'`` would run), then one
table row per setting: image AUROC, pixel AUROC and AUPRO with their 95 % intervals, the operating point's
false-alarm rate and recall, and the seconds of the bank stage and the evaluation; then each setting against the first
with paired bootstrap intervals (as ``aead compare``). The bank stage runs under
``pretrained.launcher`` (``torchrun …`` as ``python -m torch.distributed.run …``), the others under this interpreter.

    python benchmarks/real_data.py --root ../shared/data/kolektorsdd_256 --category commutator \\
        --work /tmp/real --setting default= --setting no-discriminator=pretrained.discriminator_steps=0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


STAGES = (("prepare-split", ["prepare_split.py"]), ("build-pretrained-bank", ["build_pretrained_bank.py"]),
          ("evaluate-pretrained", ["evaluate.py", "--method", "pretrained"]))
EXPORT = ("export", ["export.py", "--method", "pretrained"])


def parse_setting(text: str) -> tuple[str, list[str]]:
    """``NAME=KEY=VALUE[,KEY=VALUE…]`` -> (NAME, ["KEY=VALUE", …]); a comma inside ``[…]`` belongs to a list value."""
    name, _, rest = text.partition("=")
    return name, [o for o in re.split(r",(?![^\[]*\])", rest) if o]


def run_setting(work: Path, root: Path, category: str, overrides: list[str], export: bool = False) -> dict:
    """Run the three stages (and with ``export`` the export stage) in ``work`` (replaced): the headline metrics, each
    stage's seconds and its process's peak memory in GB."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(root.resolve()), categories=[category], prepared_dir="prepared")
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        if name not in params[section]:
            raise SystemExit(f"--setting: {key} is not a key of params.yaml")
        params[section][name] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    seconds, peak_gb = {}, {}
    for stage, args in (*STAGES, EXPORT) if export else STAGES:
        start = time.perf_counter()
        launcher = bank_launcher(params) if stage == "build-pretrained-bank" else [sys.executable]
        with open(work / "log.txt", "a") as log:
            proc = subprocess.Popen([*launcher, str(REPO / "stages" / args[0]), *args[1:]], cwd=work,
                                    stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # its resource use: the largest of its processes under torchrun
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{stage} failed; see {work / 'log.txt'}")
        seconds[stage] = time.perf_counter() - start
        peak_gb[stage] = usage.ru_maxrss / 1e6  # kB on Linux
    details = json.loads((work / "metrics" / "details" / "evaluate-pretrained.json").read_text())
    return {"metrics": json.loads((work / "metrics" / "pretrained.json").read_text()), "seconds": seconds,
            "peak_gb": peak_gb, "params": params,
            "by_defect_type": details["pretrained"]["categories"][category]["by_defect_type"]}


def bank_launcher(params: dict) -> list[str]:
    """The bank stage's launcher (``pretrained.launcher``) with this interpreter: ``torchrun ARGS`` becomes
    ``python -m torch.distributed.run ARGS``."""
    words = str(params["pretrained"].get("launcher", "python")).split()
    return [sys.executable, "-m", "torch.distributed.run", *words[1:]] if words[0] == "torchrun" else [sys.executable]


def paired(first: Path, other: Path) -> str:
    """``aead compare``'s table for the pretrained map of two settings' work folders (the same test images, so the
    same bootstrap resamples): B - A with its paired interval."""
    import numpy as np

    from aead.evaluation.comparison import Run, compare_runs, format_comparison, resample_count

    runs = []
    for folder in (first, other):
        run = Run(folder.name, folder.name)
        run.details["pretrained"] = json.loads((folder / "metrics" / "details" / "evaluate-pretrained.json").read_text())
        with np.load(folder / "metrics" / "resamples" / "evaluate-pretrained.npz") as npz:
            run.resamples["pretrained"] = {k: npz[k] for k in npz.files}
        runs.append(run)
    a, b = runs
    return format_comparison(a, b, compare_runs(a, b, 0.95, ("pretrained",)), 0.95, resample_count(a))


def cell(m: dict, key: str) -> str:
    low, high = m.get(f"{key}_low"), m.get(f"{key}_high")
    if m.get(key) is None:
        return "–"
    return f"{m[key]:.3f}" if low is None else f"{m[key]:.3f} [{low:.3f}, {high:.3f}]"


def type_cell(m: dict | None) -> str:
    if m is None or m["image_auroc"] is None:
        return "–"
    ci = m["image_auroc_ci"]
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{m['image_auroc']:.3f}{interval} ({m['n']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="MVTec-layout folder")
    ap.add_argument("--category", required=True)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder; one subfolder per setting (replaced)")
    ap.add_argument("--setting", action="append", required=True,
                    help="NAME=KEY=VALUE[,KEY=VALUE…] (params keys as section.key); NAME= for the committed params")
    a = ap.parse_args()
    rows = []
    for setting in a.setting:
        name, overrides = parse_setting(setting)
        result = run_setting(a.work / name, a.root, a.category, overrides)
        print(name, json.dumps(result), flush=True)
        rows.append((name, result))
    keys = ("image_auroc", "pixel_auroc", "aupro", "false_alarm_rate", "recall")
    print(f"| setting | {' | '.join(keys)} | bank s | bank peak GB | evaluation s |")
    print("|---|" + "---|" * (len(keys) + 3))
    for name, r in rows:
        m, s = r["metrics"], r["seconds"]
        print(f"| {name} | {' | '.join(cell(m, k) for k in keys)} | {s['build-pretrained-bank']:.0f} | "
              f"{r['peak_gb']['build-pretrained-bank']:.2f} | {s['evaluate-pretrained']:.0f} |")
    kinds = sorted({kind for _, r in rows for kind in r["by_defect_type"]})
    print(f"\nimage AUROC by defect type (its images against all the good ones)\n| setting | {' | '.join(kinds)} |")
    print("|---|" + "---|" * len(kinds))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(type_cell(r["by_defect_type"].get(kind)) for kind in kinds) + " |")
    for name, _ in rows[1:]:
        print("\n" + paired(a.work / rows[0][0], a.work / name))


if __name__ == "__main__":
    main()
