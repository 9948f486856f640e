"""The pretrained map's stages on one real MVTec-layout category, under the committed params with some keys set, one
run per setting, side by side: prepare-split, build-pretrained-bank and evaluate-pretrained as stage scripts in a
scratch folder (the code and params ``dvc exp run -S data.root=… -S 'data.categories=[…]'`` would run), then one
table row per setting: image AUROC, pixel AUROC and AUPRO with their 95 % intervals, the operating point's
false-alarm rate and recall, and the seconds of the bank stage and the evaluation.

    python benchmarks/real_data.py --root ../shared/data/kolektorsdd_256 --category commutator \\
        --work /tmp/real --setting default= --setting no-discriminator=pretrained.discriminator_steps=0
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_setting(work: Path, root: Path, category: str, overrides: list[str]) -> dict:
    """Run the three stages in ``work`` (replaced) and return the headline metrics and stage seconds."""
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
    seconds = {}
    for stage, args in (("prepare-split", ["prepare_split.py"]), ("build-pretrained-bank", ["build_pretrained_bank.py"]),
                        ("evaluate-pretrained", ["evaluate.py", "--method", "pretrained"])):
        start = time.perf_counter()
        with open(work / "log.txt", "a") as log:
            subprocess.run([sys.executable, str(REPO / "stages" / args[0]), *args[1:]], cwd=work, check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        seconds[stage] = time.perf_counter() - start
    return {"metrics": json.loads((work / "metrics" / "pretrained.json").read_text()), "seconds": seconds}


def cell(m: dict, key: str) -> str:
    low, high = m.get(f"{key}_low"), m.get(f"{key}_high")
    if m.get(key) is None:
        return "–"
    return f"{m[key]:.3f}" if low is None else f"{m[key]:.3f} [{low:.3f}, {high:.3f}]"


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
        name, _, rest = setting.partition("=")
        result = run_setting(a.work / name, a.root, a.category, [o for o in rest.split(",") if o])
        print(name, json.dumps(result), flush=True)
        rows.append((name, result))
    keys = ("image_auroc", "pixel_auroc", "aupro", "false_alarm_rate", "recall")
    print(f"| setting | {' | '.join(keys)} | bank s | evaluation s |")
    print("|---|" + "---|" * (len(keys) + 2))
    for name, r in rows:
        m, s = r["metrics"], r["seconds"]
        print(f"| {name} | {' | '.join(cell(m, k) for k in keys)} | {s['build-pretrained-bank']:.0f} | "
              f"{s['evaluate-pretrained']:.0f} |")


if __name__ == "__main__":
    main()
