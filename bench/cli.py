"""How long the ``cul8er`` command takes before it does anything, against ``celery --help``.

    python bench/cli.py [--runs 9]

Each command runs ``--runs`` times as a fresh process (the way ops scripts call it in loops):
``cul8er --help``, ``cul8er tenant list --json`` on a migrated SQLite data dir of its own, and
``celery --help`` from the same environment as the baseline. Prints p50/p90 wall times and each
one's ratio to the baseline's p50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import emit  # noqa: E402

BIN = Path(sys.executable).parent


def wall_times(command: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall seconds of ``runs`` fresh runs of ``command`` (its output discarded)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, check=False, timeout=60)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr.decode()[-500:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cul8er-bench-cli-") as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
        env["CUL8ER_DATA_DIR"] = data_dir
        subprocess.run(
            [str(BIN / "cul8er"), "db", "upgrade"], env=env, check=True, capture_output=True
        )
        commands = {
            "celery --help": [str(BIN / "celery"), "--help"],
            "cul8er --help": [str(BIN / "cul8er"), "--help"],
            "cul8er tenant list --json": [str(BIN / "cul8er"), "tenant", "list", "--json"],
        }
        # Warm the file cache once, then measure.
        for command in commands.values():
            subprocess.run(command, env=env, capture_output=True, check=False, timeout=60)
        measured = {name: wall_times(cmd, env, args.runs) for name, cmd in commands.items()}
    base = statistics.median(measured["celery --help"])
    print(f"{'command':<28}{'p50 s':>8}{'p90 s':>8}{'x celery --help':>17}")
    for name, times in measured.items():
        ordered = sorted(times)
        p50 = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        print(f"{name:<28}{p50:>8.3f}{p90:>8.3f}{p50 / base:>17.2f}")
        emit(
            name,
            {
                "runs": len(times),
                "p50_s": round(p50, 3),
                "p90_s": round(p90, 3),
                "ratio_to_celery_help_p50": round(p50 / base, 2),
            },
        )


if __name__ == "__main__":
    main()
