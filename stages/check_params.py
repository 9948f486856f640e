"""Stage check-params: validate params.yaml and what it names (backbone weights, launcher) before any other stage
runs; every stage depends on its output, so an invalid experiment stops here with its outputs untouched."""

import argparse

from aead import io
from aead.cli import log, run_stage
from aead.preflight import PASSED, preflight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/params-check.json", help="written when the check passes")
    args = parser.parse_args()
    preflight(args.params)
    io.write_json(args.out, PASSED)
    log(f"{args.params}: valid")


if __name__ == "__main__":
    run_stage(main)
