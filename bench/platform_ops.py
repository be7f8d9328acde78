"""Latency of each platform operation against the real engines: create, set_limits, stats, destroy.

    python bench/platform_ops.py [--n 20] [--platforms local,docker,incus]

A platform whose engine is not running here is reported as skipped.
Prints p50/p95/p99 per operation; never fails on timing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import emit, percentiles  # noqa: E402


def run(platform_name: str, n: int) -> dict[str, dict[str, float]]:
    from schemas.platform import InstanceSpec, Limits
    from workers.pluginhost.handles import get_platform
    from workers.runtime.errors import Cul8erError
    from workers.runtime.settings import Settings

    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="cul8er-bench-")))
    platform = get_platform(platform_name, settings)
    try:
        platform.list_instances()
    except Cul8erError as exc:
        print(f"\n== {platform_name}: skipped ({exc})")
        return {}
    timings: dict[str, list[float]] = {"create": [], "set_limits": [], "stats": [], "destroy": []}
    tenant = f"bench{uuid.uuid4().hex[:6]}"
    for i in range(n):
        name = f"t-{tenant}-app-{i}"
        spec = InstanceSpec(
            name=name, tenant_id=tenant, ordinal=i, limits=Limits(cpu_cores=0.5, memory_mb=256)
        )
        for op, call in (
            ("create", lambda: platform.create_instance(spec)),  # noqa: B023
            ("set_limits", lambda: platform.set_limits(name, Limits(cpu_cores=1, memory_mb=512))),  # noqa: B023
            ("stats", lambda: platform.stats(name)),  # noqa: B023
            ("destroy", lambda: platform.destroy_instance(name)),  # noqa: B023
        ):
            started = time.perf_counter()
            call()
            timings[op].append((time.perf_counter() - started) * 1000)
    return {op: percentiles(samples) for op, samples in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--platforms", default="local,docker,incus")
    args = parser.parse_args()
    from workers.runtime.logging import configure_logging

    configure_logging(fmt="console", level="WARNING")
    for platform_name in args.platforms.split(","):
        for op, figures in run(platform_name, args.n).items():
            emit(f"{platform_name} {op} (ms)", figures)


if __name__ == "__main__":
    main()
