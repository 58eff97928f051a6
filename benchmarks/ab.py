"""A/B of the in-process benchmark between commits and this checkout, interleaved.

`python -m benchmarks.ab A [B ...] [--rounds 9]` exports each commit with `git archive` into
a temporary directory (with this checkout's generated admin API code and benchmark scripts,
so every side runs the same measurement), then runs `python -m benchmarks.check_path
--json` in each in turn (this checkout last, or where '.' is named), `--rounds` times, and
prints the median of each number and its ratio to the first. With `--end-to-end SECONDS`,
each round is one round of `benchmarks.run --only h,h0,b,e` per commit instead (the
sidecar of each commit behind the real Envoy), reduced to the ratios the targets name.
On a shared machine only numbers measured this way, side by side, are compared."""

import argparse
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sidecar.dev.processes import ensure_tool

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("benchmarks/check_path.py",)  # the same measurement on every side


def export(commit: str, into: Path) -> None:
    git = ensure_tool("git", "git")
    archive = subprocess.run([git, "-C", str(ROOT), "archive", commit], check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tree:
        tree.extractall(into, filter="data")
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


# One scenario's line as benchmarks.run prints it (report.one_line), at 32 connections.
_AT_32 = re.compile(r"c32: ([\d.]+) req/s .*?cpu/req ([\d.]+) ms")
_SCENARIO = re.compile(r"^\[(\w+)\] round")


def run_end_to_end(tree: Path, seconds: float) -> dict[str, float]:
    """One round of (h), (h0), (b), (e) with the sidecar of `tree`: the ratios to the floors."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--only", "h,h0,b,e", "--rounds", "1"]
        + ["--seconds", str(seconds), "--no-write"],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found: dict[str, tuple[float, float]] = {}
    scenario = ""
    for line in out.splitlines():
        if started := _SCENARIO.match(line):
            scenario = started.group(1)
        elif (at_32 := _AT_32.search(line)) and scenario:
            found[scenario] = (float(at_32.group(1)), float(at_32.group(2)))
    return {
        "h_rps_vs_h0": found["h"][0] / found["h0"][0],
        "h_cpu_vs_h0": found["h"][1] / found["h0"][1],
        "b_rps_vs_e": found["b"][0] / found["e"][0],
        "b_cpu_vs_e": found["b"][1] / found["e"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commits", nargs="+", help="commits to compare, in order; '.' is this checkout")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--end-to-end",
        type=float,
        metavar="SECONDS",
        help="instead: one round of benchmarks.run (h, h0, b, e; SECONDS per measurement) per commit "
        "and round, and the ratios of (h) to (h0) and (b) to (e) at 32 connections",
    )
    args = parser.parse_args()
    commits: list[str] = args.commits if "." in args.commits else [*args.commits, "."]
    with tempfile.TemporaryDirectory(prefix="graysteer-ab-") as temp:
        trees = []
        for number, commit in enumerate(commits):
            if commit == ".":
                trees.append(ROOT)
                continue
            tree = Path(temp) / str(number)
            tree.mkdir()
            export(commit, tree)
            trees.append(tree)
        runs: list[list[dict[str, float]]] = [[] for _ in commits]
        for _ in range(args.rounds):
            for tree, results in zip(trees, runs, strict=True):
                if args.end_to_end:
                    results.append(run_end_to_end(tree, args.end_to_end))
                else:
                    results.append(run_once(tree))
    unit = "ratios" if args.end_to_end else "µs per call"
    print(f"medians of {args.rounds} interleaved rounds, {unit} (ratio to {commits[0]})")
    print(f"{'':22} " + " ".join(f"{c[:10]:>16}" for c in commits))
    for key in runs[0][0]:
        medians = [statistics.median(r[key] for r in results) for results in runs]
        cells = [f"{m:7.2f} ({m / medians[0]:4.2f})" for m in medians]
        print(f"{key:22} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
