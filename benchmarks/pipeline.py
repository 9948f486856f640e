"""Where the wall time of a default ``dvc repro`` goes: each stage's wall time against the computation it records in
``metrics/details/`` (training, bank building and scoring seconds); the rest is the stage's fixed cost (starting
Python, imports, reading inputs, metrics and plots) and DVC's bookkeeping.

It copies this repository's tracked and untracked files (not its DVC cache or outputs) into a fresh git repository
in a temporary folder, runs ``dvc repro`` there once, and prints one row per stage and the share of the run's wall
time that is recorded computation.

    python benchmarks/pipeline.py                    # ~6 min on 2 CPU cores
    python benchmarks/pipeline.py --out pipeline.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the computation a stage's details record: training, bank building and scoring (the narrow count), and the other
# stages' and phases' own work: generating and preparing images, scoring validation images, bootstrap and metrics,
# exporting
NARROW = ("train_seconds", "build_seconds", "scoring_seconds")
RECORDED = NARROW + ("generate_seconds", "prepare_seconds", "validation_seconds", "metrics_seconds", "export_seconds",
                     "discriminator_seconds", "part_scales_seconds")


def details_file(stage: str) -> str:
    """The metrics/details file a stage writes its timings to (train-head@baseline -> head-baseline.json)."""
    name = stage.replace("train-head@", "head-").replace("build-bank@", "bank-")
    return {"build-pretrained-bank": "pretrained-bank"}.get(name, name) + ".json"


def recorded_seconds(obj: object, keys: tuple[str, ...] = RECORDED) -> float:
    """The seconds under ``keys`` in a details file: where a level has some, those (a total beside its per-category
    parts), else the sum over its children."""
    if isinstance(obj, dict):
        own = [v for k, v in obj.items() if k in keys and isinstance(v, (int, float))]
        return sum(own) if own else sum(recorded_seconds(v, keys) for v in obj.values())
    if isinstance(obj, list):
        return sum(recorded_seconds(v, keys) for v in obj)
    return 0.0


def copy_repository(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True)


def run_repro(workdir: Path) -> tuple[float, dict[str, float]]:
    """Run ``dvc repro`` and return its wall time and each stage's, from when DVC announces it to the next."""
    start = time.perf_counter()
    stages: dict[str, float] = {}
    current, since = None, start
    proc = subprocess.Popen(["dvc", "repro"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.match(r"Running stage '([^']+)'", line)
        if match:
            now = time.perf_counter()
            if current:
                stages[current] = now - since
            current, since = match.group(1), now
    if proc.wait() != 0:
        sys.exit("dvc repro failed")
    end = time.perf_counter()
    if current:
        stages[current] = end - since
    return end - start, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        copy_repository(workdir)
        wall, stages = run_repro(workdir)
        rows = []
        for stage, seconds in stages.items():
            path = workdir / "metrics" / "details" / details_file(stage)
            details = json.loads(path.read_text()) if path.is_file() else {}
            rows.append({"stage": stage, "wall_seconds": round(seconds, 1),
                         "recorded_seconds": round(recorded_seconds(details), 1),
                         "narrow_seconds": round(recorded_seconds(details, NARROW), 1)})
    total = sum(r["recorded_seconds"] for r in rows)
    narrow = sum(r["narrow_seconds"] for r in rows)
    print(f"{'stage':26} {'wall s':>7} {'recorded s':>10} {'of which train/build/score':>26} {'rest s':>7}")
    for r in rows:
        print(f"{r['stage']:26} {r['wall_seconds']:7.1f} {r['recorded_seconds']:10.1f} {r['narrow_seconds']:26.1f} "
              f"{r['wall_seconds'] - r['recorded_seconds']:7.1f}")
    print(f"{'dvc repro':26} {wall:7.1f} {total:10.1f} {narrow:26.1f} {wall - total:7.1f}")
    print(f"recorded computation: {100 * total / wall:.0f} % of the wall time (training, bank building and scoring "
          f"alone: {100 * narrow / wall:.0f} %)")
    if args.out:
        args.out.write_text(json.dumps({"wall_seconds": wall, "recorded_seconds": total, "narrow_seconds": narrow,
                                        "stages": rows}, indent=2))


if __name__ == "__main__":
    main()
