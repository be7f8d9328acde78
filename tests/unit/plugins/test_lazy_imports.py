"""Loading a built-in imports its own code only: SDKs and client libraries wait for first use.

Every worker loads every built-in at boot, most of which it never calls. The test loads
them in a fresh interpreter that has imported what a worker has before plugins load (the
registry, the settings), one after the other in manifest order as a registry boot does, and
looks at ``sys.modules`` after each load: a library one plugin imports is charged to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Final

from plugins.builtin import BUILTIN_MANIFESTS

ROOT = Path(__file__).resolve().parents[3]

#: Libraries that cost a load a lot (milliseconds to a tenth of a second each) and that
#: only a call needs: SDKs of the engines, HTTP clients, retry helpers, metric clients.
HEAVY: Final = (
    "cryptography.fernet",
    "docker",
    "prometheus_client",
    "psutil",
    "pylxd",
    "requests",
    "tenacity",
)

#: Runs in a fresh interpreter: loads the built-ins named in argv[1] (JSON) in that order and
#: prints which of the modules in argv[2] were there before, and which each load added.
_CHILD: Final = textwrap.dedent(
    """\
    import json, sys

    import workers.pluginhost.registry  # noqa: F401  (what a worker has before plugins load)
    from plugins.builtin import builtin_manifest
    from workers.pluginhost.loader import load_builtin
    from workers.runtime.settings import Settings  # noqa: F401

    names, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    seen = {m for m in heavy if m in sys.modules}
    out = {"before": sorted(seen), "added": {}}
    for name in names:
        load_builtin(builtin_manifest(name))
        now = {m for m in heavy if m in sys.modules}
        out["added"][name] = sorted(now - seen)
        seen = now
    print(json.dumps(out))
    """
)


def _load_in_fresh_process(names: list[str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUL8ER_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(names), json.dumps(HEAVY)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_loading_the_builtins_in_boot_order_imports_no_sdk() -> None:
    # Given a fresh interpreter with what a worker imports before its plugins
    names = [m.name for m in BUILTIN_MANIFESTS]
    # When every built-in is loaded (imported, contract and config model checked) in
    # manifest order, as a registry boot does
    imported = _load_in_fresh_process(names)
    # Then no heavy library was there before, and no plugin's load imported one
    assert imported["before"] == []
    assert imported["added"] == {name: [] for name in names}
