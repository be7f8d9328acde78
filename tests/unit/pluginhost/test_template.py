"""The plugin template (``cul8er plugin new``) writes strategy and load-balancer plugins that
load through every check and do what their contract says, in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas.delivery import AnalysisConfig
from schemas.manifest import PluginType
from schemas.plugins import (
    AnalysisInput,
    Backend,
    DeploymentSpec,
    Frontend,
    HeaderRoute,
    StagePlan,
    Weights,
)
from tests.plugin_factory import make_plugin
from workers.pluginhost.contracts import check_contract, operations
from workers.pluginhost.discovery import read_candidate
from workers.pluginhost.loader import build_instance, load_candidate, validate_config
from workers.pluginhost.registry import PluginRegistry
from workers.runtime.settings import Settings


def build(tmp_path: Path, name: str, plugin_type: PluginType) -> Any:
    """The template's plugin of ``plugin_type``, loaded and built as the registry does."""
    root = make_plugin(tmp_path / "src", name, plugin_type=plugin_type)
    settings = Settings(data_dir=tmp_path / "data")
    loaded = load_candidate(read_candidate(f"path:{root}", root), settings)
    plugin = build_instance(
        loaded, validate_config(loaded, {}), PluginRegistry(settings).context(loaded)
    )
    check_contract(name, plugin_type, type(plugin))
    return plugin


@pytest.mark.parametrize("plugin_type", list(PluginType))
def test_every_template_loads_and_answers_its_contract(
    tmp_path: Path, plugin_type: PluginType
) -> None:
    # Given the template's plugin of each type
    # When it is loaded through the checksum, import and contract checks
    plugin = build(tmp_path, "made", plugin_type)
    # Then every operation of its contract is there
    assert all(callable(getattr(plugin, op)) for op in operations(plugin_type))


def test_strategy_template_plans_the_new_actions_and_judges(tmp_path: Path) -> None:
    # Given the template's strategy
    strategy = build(tmp_path, "mystrategy", PluginType.STRATEGY)
    spec = DeploymentSpec(deployment_id="d-1", tenant_id="acme", version="2", instances=["a"])
    # When it plans a deployment
    plan = strategy.plan(spec)
    # Then the plan uses the stage actions of the contract, its gate is an AnalysisConfig,
    # and it ends in one promote
    assert isinstance(plan, StagePlan)
    assert [s.action for s in plan.stages] == [
        "create_group",
        "set_weight",
        "pause",
        "analysis",
        "promote",
    ]
    gate = next(s for s in plan.stages if s.action == "analysis")
    assert gate.params["target"] == "canary"
    AnalysisConfig.model_validate({k: v for k, v in gate.params.items() if k != "target"})
    # And it judges measurements by its configured error rate
    verdicts = [
        strategy.analyze(AnalysisInput(deployment=spec, stage=gate, metrics=metrics)).decision
        for metrics in (
            {"requests": 100, "error_rate": 0.0},
            {"requests": 100, "error_rate": 0.5},
            {"requests": 0},
        )
    ]
    assert verdicts == ["pass", "fail", "inconclusive"]


def test_load_balancer_template_keeps_frontends_groups_and_routes(tmp_path: Path) -> None:
    # Given the template's load balancer
    balancer = build(tmp_path, "mybalancer", PluginType.LOAD_BALANCER)
    # When a tenant's frontend is ensured twice
    first = balancer.ensure_frontend(Frontend(tenant_id="acme"))
    again = balancer.ensure_frontend(Frontend(tenant_id="acme"))
    # Then it keeps its address, and only the first call "reloaded"
    assert first.address == again.address and first.reloaded and not again.reloaded
    assert not balancer.health("acme").healthy
    # When it gets a stable and a canary backend, a split and a header route
    balancer.add_backend(Backend(tenant_id="acme", name="s1", address="127.0.0.1:9001"))
    balancer.add_backend(
        Backend(tenant_id="acme", name="c1", address="127.0.0.1:9002", group="canary")
    )
    balancer.set_weights(Weights(tenant_id="acme", weights={"stable": 90, "canary": 10}))
    balancer.route_by_header(HeaderRoute(tenant_id="acme", header="X-Canary", value="always"))
    # Then its stats show them
    stats = balancer.stats("acme")
    assert {(s.name, s.group, s.weight) for s in stats.servers} == {
        ("s1", "stable", 90),
        ("c1", "canary", 10),
    }
    assert [r.header for r in stats.routes] == ["X-Canary"]
    assert balancer.health("acme").healthy
    # When the route is cleared and the frontend removed
    balancer.route_by_header(
        HeaderRoute(tenant_id="acme", header="X-Canary", value="always", group=None)
    )
    assert balancer.stats("acme").routes == []
    assert balancer.remove_frontend("acme").ok
    assert balancer.remove_frontend("acme").ok  # twice: still success
    # Then nothing of the tenant is left
    assert balancer.stats("acme").servers == [] and not balancer.health("acme").healthy


# -- an author's first steps --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "name"),
    [
        ("acme-observer", "acme_observer"),
        ("Acme.Observer", "acme_observer"),
        ("acme  observer", "acme_observer"),
        ("hello", "hello"),
    ],
)
def test_a_typed_name_is_normalised_as_packaging_does(typed: str, name: str) -> None:
    from workers.pluginhost.template import plugin_name

    assert plugin_name(typed) == name


@pytest.mark.parametrize("typed", ["9lives", "", "-", "é"])
def test_a_name_that_cannot_be_normalised_is_refused_quoting_the_rule(typed: str) -> None:
    from workers.pluginhost.template import NAME_RULE, plugin_name
    from workers.runtime.errors import ValidationFailedError

    with pytest.raises(ValidationFailedError) as refused:
        plugin_name(typed)
    assert NAME_RULE in str(refused.value)
    assert refused.value.errors[0]["field"] == "name"


def test_init_with_a_dashed_name_writes_an_importable_package_that_validates_from_its_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.pluginhost import admin
    from workers.pluginhost.template import write_plugin

    project = write_plugin(tmp_path, name="acme-observer", plugin_type=PluginType.OBSERVER)
    assert project.name == "cul8er-acme-observer"
    assert (project / "cul8er_acme_observer" / "__init__.py").is_file()
    assert 'acme_observer = "cul8er_acme_observer"' in (project / "pyproject.toml").read_text()
    # `validate` takes the folder `init` printed (the manifest sits one level down), and,
    # installing nothing, says nothing about a database it does not use
    settings = Settings(data_dir=tmp_path / "no-database-here")
    result = admin.validate_path(project, settings=settings)
    assert (result["name"], result["valid"]) == ("acme_observer", True)
    printed = capsys.readouterr()
    assert "plugins_table_missing" not in printed.out + printed.err
