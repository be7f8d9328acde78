"""A service that knows only Celery: it creates a tenant by task name and watches it.

Run as ``python external_client.py BROKER BACKEND TENANT_ID``. cul8er's own
packages are blocked from import, to prove none is needed.
"""

import importlib.abc
import json
import sys
import time


class _NoCul8er(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"workers", "tasks", "schemas", "plugins", "beat_schedule"}:
            raise ImportError(f"{name} is cul8er code; this client must not need it")
        return None


sys.meta_path.insert(0, _NoCul8er())

from celery import Celery  # noqa: E402

broker, backend, tenant_id = sys.argv[1:4]
app = Celery("billing-service", broker=broker, backend=backend)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

created = app.send_task(
    "cul8er.tenants.create",
    kwargs={
        "name": "External Inc",
        "plan": "starter",
        "tenant_id": tenant_id,
        "idempotency_key": f"signup-{tenant_id}",
    },
).get(timeout=60)
assert created["ok"], created
deadline = time.monotonic() + 120
while True:
    status = app.send_task(
        "cul8er.workflows.status", kwargs={"workflow_id": created["workflow_id"]}
    ).get(timeout=30)
    if status["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
        break
    time.sleep(0.3)
tenant = app.send_task("cul8er.tenants.get", kwargs={"tenant_id": tenant_id}).get(timeout=30)
print(
    json.dumps(
        {
            "workflow": status["status"],
            "tenant": tenant["status"],
            "modules": sorted(m for m in sys.modules if m.split(".")[0] in {"workers", "tasks"}),
        }
    )
)
