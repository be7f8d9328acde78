"""Progressive delivery: releases rolled over tenants' instances (docs/architecture.md §10).

``traffic`` keeps a tenant's entry point on the load balancer in step with its instances;
``groups`` starts, replaces and removes instances of a release; ``analysis`` takes and
judges gate measurements; ``stages`` carries a deployment's stages out and rolls it back;
``commands`` is what people and services ask of a deployment.
"""

__all__: list[str] = []
