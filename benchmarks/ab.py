"""A/B of the in-process benchmark between a commit (A) and this checkout (B), interleaved.

`python -m benchmarks.ab BASE [--rounds 9]` exports BASE with `git archive` into a temporary
directory (with this checkout's generated admin API code and benchmark scripts, so both
sides run the same measurement), then runs `python -m benchmarks.check_path --json` in A
and in B alternately, `--rounds` times each, and prints the median of each number, B/A.
On a shared machine only numbers measured this way, side by side, are compared."""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("benchmarks/check_path.py", "benchmarks/decide.py")  # the same measurement on both sides


def export(commit: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    for generated in (ROOT / "sidecar" / "admin" / "api").glob("*_pb2*.py"):
        shutil.copy(generated, into / "sidecar" / "admin" / "api" / generated.name)
    for path in SHARED:
        shutil.copy(ROOT / path, into / path)


def run_once(tree: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.check_path", "--json"],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare with (A)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graysteer-ab-") as temp:
        tree = Path(temp)
        export(args.base, tree)
        a: list[dict[str, float]] = []
        b: list[dict[str, float]] = []
        for _ in range(args.rounds):
            a.append(run_once(tree))
            b.append(run_once(ROOT))
    print(f"A = {args.base}, B = this checkout; medians of {args.rounds} interleaved rounds (µs per call)")
    for key in a[0]:
        median_a = statistics.median(r[key] for r in a)
        median_b = statistics.median(r[key] for r in b)
        print(f"{key:22} A {median_a:7.2f}   B {median_b:7.2f}   B/A {median_b / median_a:5.2f}")


if __name__ == "__main__":
    main()
