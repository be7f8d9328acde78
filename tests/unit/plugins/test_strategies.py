"""The five built-in strategies: their plans, their config errors and their judge.

Strategies are pure: each test gives a ``DeploymentSpec`` and reads the ``StagePlan`` (or the
``Verdict``) back, as the engine would over a task.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from plugins.builtin import builtin_manifest
from plugins.strategies import ABTest, BlueGreen, Canary, Direct, Rolling
from plugins.strategies.rolling import RollingConfig, batches
from schemas.delivery import AnalysisConfig
from schemas.manifest import PluginType
from schemas.plugins import AnalysisInput, DeploymentSpec, Stage, StagePlan
from workers.plugin_api import PermanentError, PluginContext, ValidationFailedError
from workers.pluginhost.contracts import Strategy, check_contract
from workers.runtime.settings import Settings

FIVE = ["a", "b", "c", "d", "e"]

STRATEGIES: dict[str, type[Any]] = {
    "direct": Direct,
    "rolling": Rolling,
    "blue_green": BlueGreen,
    "canary": Canary,
    "ab_test": ABTest,
}


def spec(
    config: dict[str, Any] | None = None, instances: list[str] | None = None
) -> DeploymentSpec:
    """A deployment of release 2 over the tenant's instances (five by default)."""
    return DeploymentSpec(
        deployment_id="d-1",
        tenant_id="acme",
        version="2",
        previous_version="1",
        instances=FIVE if instances is None else instances,
        config=config or {},
    )


def plan(strategy: type[Any], config: dict[str, Any] | None = None, **kwargs: Any) -> StagePlan:
    """``strategy``'s plan, built as the registry builds it (no config, a context)."""
    result = strategy(None, None).plan(spec(config, **kwargs))
    assert isinstance(result, StagePlan)
    return result


def outline(stages: StagePlan) -> list[tuple[str, str, int | None, float | None]]:
    """Each stage as (name, action, weight, pause seconds of a pause)."""
    return [
        (s.name, s.action, s.weight, s.pause_seconds if s.action == "pause" else None)
        for s in stages.stages
    ]


def refused(strategy: type[Any], config: dict[str, Any]) -> list[str]:
    """The fields a refused ``config`` names."""
    with pytest.raises(ValidationFailedError) as caught:
        plan(strategy, config)
    assert isinstance(caught.value, PermanentError)
    assert str(caught.value).startswith("invalid strategy_config")
    return [error["field"] for error in caught.value.errors]


def gate(stage: Stage) -> AnalysisConfig:
    """The analysis gate an ``analysis`` stage carries."""
    assert stage.action == "analysis" and stage.params["target"] == "canary"
    return AnalysisConfig.model_validate({k: v for k, v in stage.params.items() if k != "target"})


# -- contracts --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_builtin_manifests_name_the_classes_and_they_fulfil_the_contract(name: str) -> None:
    # Given the built-in manifest of a strategy
    manifest = builtin_manifest(name)
    assert manifest is not None and manifest.type is PluginType.STRATEGY
    # When its factory is imported and called as the registry calls it
    factory = getattr(importlib.import_module(manifest.module), manifest.factory)
    assert factory is STRATEGIES[name]
    check_contract(name, PluginType.STRATEGY, factory)
    context = PluginContext(
        name=name, version="1.0.0", data_dir=Path("/nonexistent"), settings=Settings()
    )
    # Then it is a strategy and takes no config model
    assert manifest.config_model is None
    assert isinstance(factory(None, context), Strategy)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("direct", {}),
        ("rolling", {}),
        ("rolling", {"max_surge": "25%", "max_unavailable": "25%", "analysis": {}}),
        ("rolling", {"pause_seconds": None}),
        ("blue_green", {}),
        ("blue_green", {"auto_promotion_seconds": 0, "scale_down_delay_seconds": 0}),
        ("canary", {}),
        ("canary", {"interval_seconds": None, "analysis": None}),
        ("canary", {"steps": [{"set_weight": 10}, {"set_weight": 10}, {"pause": {}}]}),
        ("ab_test", {}),
        ("ab_test", {"promote": "manual", "cookie": "beta"}),
    ],
)
def test_every_plan_is_valid_unique_and_ends_in_one_promote(
    name: str, config: dict[str, Any]
) -> None:
    # Given a strategy and a config
    # When it plans
    stages = plan(STRATEGIES[name], config).stages
    # Then the plan round-trips as JSON, its names are unique, and only its last is promote
    assert StagePlan.model_validate_json(StagePlan(stages=stages).model_dump_json()).stages
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    assert [s.action for s in stages].count("promote") == 1
    assert stages[-1].action == "promote" and stages[-1].name == "promote"
    for stage in stages:
        if stage.action == "analysis":
            gate(stage)


# -- direct -----------------------------------------------------------------------------------


def test_direct_creates_a_full_group_and_switches_everything() -> None:
    stages = plan(Direct)
    assert outline(stages) == [
        ("create-canary", "create_group", None, None),
        ("weight-100", "set_weight", 100, None),
        ("promote", "promote", None, None),
    ]
    assert stages.stages[0].params == {"count": None}


def test_direct_takes_no_config() -> None:
    assert refused(Direct, {"max_surge": 1}) == ["strategy_config.max_surge"]


# -- rolling ----------------------------------------------------------------------------------


def test_rolling_default_replaces_one_instance_at_a_time_with_one_extra() -> None:
    stages = plan(Rolling)
    assert outline(stages) == [
        *((f"replace-{n}", "replace", None, None) for n in range(1, 6)),
        ("promote", "promote", None, None),
    ]
    assert [s.params for s in stages.stages[:-1]] == [
        {"instances": [name], "surge": 1} for name in FIVE
    ]


@pytest.mark.parametrize(
    ("surge", "unavailable", "sizes", "surges"),
    [
        (1, 0, [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]),
        # 25 % of 5: the surge rounds up (2), the unavailable down (1), as in Kubernetes.
        ("25%", "25%", [3, 2], [2, 2]),
        (2, 0, [2, 2, 1], [2, 2, 1]),
        (0, 2, [2, 2, 1], [0, 0, 0]),
        # Both round down to 0: one at a time unavailable (Kubernetes does the same).
        (0, "10%", [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]),
        ("100%", 0, [5], [5]),
    ],
)
def test_rolling_batches_as_kubernetes_resolves_surge_and_unavailable(
    surge: int | str, unavailable: int | str, sizes: list[int], surges: list[int]
) -> None:
    config = RollingConfig(max_surge=surge, max_unavailable=unavailable)
    cut = batches(FIVE, config)
    assert [len(batch) for batch, _ in cut] == sizes
    assert [n for _, n in cut] == surges
    assert [name for batch, _ in cut for name in batch] == FIVE
    stages = plan(Rolling, {"max_surge": surge, "max_unavailable": unavailable})
    assert [s.params for s in stages.stages if s.action == "replace"] == [
        {"instances": batch, "surge": n} for batch, n in cut
    ]


def test_rolling_pauses_and_analyses_after_each_batch() -> None:
    stages = plan(
        Rolling,
        {"max_surge": 2, "pause_seconds": 5, "analysis": {"count": 2}},
        instances=["a", "b", "c"],
    )
    assert outline(stages) == [
        ("replace-1", "replace", None, None),
        ("pause-1", "pause", None, 5.0),
        ("analysis-1", "analysis", None, None),
        ("replace-2", "replace", None, None),
        ("pause-2", "pause", None, 5.0),
        ("analysis-2", "analysis", None, None),
        ("promote", "promote", None, None),
    ]
    assert gate(stages.stages[2]).count == 2


@pytest.mark.parametrize("zero", [0, "0%"])
def test_rolling_refuses_no_surge_and_no_unavailable(zero: int | str) -> None:
    assert refused(Rolling, {"max_surge": zero, "max_unavailable": 0}) == [
        "strategy_config.max_surge",
        "strategy_config.max_unavailable",
    ]


@pytest.mark.parametrize("bad", [-1, "25", "101%", "x%", 1.5, True])
def test_rolling_refuses_a_bad_amount(bad: Any) -> None:
    assert refused(Rolling, {"max_surge": bad}) == ["strategy_config.max_surge"]


def test_rolling_refuses_a_tenant_without_instances() -> None:
    # Given a tenant with no instances: a plan of just "promote" would succeed doing nothing
    with pytest.raises(ValidationFailedError) as caught:
        plan(Rolling, instances=[])
    # Then it is refused, naming the instances
    assert caught.value.errors[0]["field"] == "instances"
    assert "no instances" in str(caught.value)


# -- blue-green -------------------------------------------------------------------------------


def test_blue_green_default_waits_for_a_person_and_keeps_the_old_stack_warm() -> None:
    stages = plan(BlueGreen)
    assert outline(stages) == [
        ("create-preview", "create_group", None, None),
        ("route-preview", "route", None, None),
        ("pre-promotion-analysis", "analysis", None, None),
        ("await-promotion", "pause", None, None),
        ("switch", "set_weight", 100, None),
        ("scale-down-delay", "pause", None, 30.0),
        ("promote", "promote", None, None),
    ]
    assert stages.stages[0].params == {"count": None}
    assert stages.stages[1].params == {"header": "X-Cul8er-Preview", "value": "true"}
    assert gate(stages.stages[2]) == AnalysisConfig()


def test_blue_green_auto_promotion_and_post_promotion_analysis() -> None:
    stages = plan(
        BlueGreen,
        {
            "preview_header": "X-Preview",
            "preview_value": "yes",
            "pre_promotion_analysis": None,
            "auto_promotion_seconds": 60,
            "post_promotion_analysis": {"count": 4},
            "scale_down_delay_seconds": 120,
        },
    )
    assert outline(stages) == [
        ("create-preview", "create_group", None, None),
        ("route-preview", "route", None, None),
        ("auto-promotion", "pause", None, 60.0),
        ("switch", "set_weight", 100, None),
        ("post-promotion-analysis", "analysis", None, None),
        ("scale-down-delay", "pause", None, 120.0),
        ("promote", "promote", None, None),
    ]
    assert stages.stages[1].params == {"header": "X-Preview", "value": "yes"}
    assert gate(stages.stages[4]).count == 4


def test_blue_green_immediate_promotion_has_no_pauses() -> None:
    stages = plan(BlueGreen, {"auto_promotion_seconds": 0, "scale_down_delay_seconds": 0})
    assert [s.action for s in stages.stages] == [
        "create_group",
        "route",
        "analysis",
        "set_weight",
        "promote",
    ]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"auto_promotion_seconds": -1}, "strategy_config.auto_promotion_seconds"),
        ({"preview_header": "bad header"}, "strategy_config.preview_header"),
        ({"pre_promotion_analysis": {"count": 0}}, "strategy_config.pre_promotion_analysis.count"),
        ({"autoPromotionSeconds": 10}, "strategy_config.autoPromotionSeconds"),
    ],
)
def test_blue_green_refuses_bad_config(config: dict[str, Any], field: str) -> None:
    assert refused(BlueGreen, config) == [field]


# -- canary -----------------------------------------------------------------------------------


def weights_of(stages: StagePlan) -> list[int | None]:
    return [s.weight for s in stages.stages if s.action == "set_weight"]


def test_canary_default_is_ten_percent_then_twenty_more_each_period() -> None:
    stages = plan(Canary)
    expected: list[tuple[str, str, int | None, float | None]] = [
        ("create-canary", "create_group", None, None)
    ]
    for weight in (10, 30, 50, 70, 90, 100):
        expected += [
            (f"weight-{weight}", "set_weight", weight, None),
            (f"pause-{weight}", "pause", None, 10.0),
            (f"analysis-{weight}", "analysis", None, None),
        ]
    assert outline(stages) == [*expected, ("promote", "promote", None, None)]
    assert stages.stages[0].params == {"count": 1}
    assert all(gate(s) == AnalysisConfig() for s in stages.stages if s.action == "analysis")


@pytest.mark.parametrize(
    ("config", "weights"),
    [
        # Flagger #189: max_weight is reached even when the steps skip over it.
        ({"step_weight": 30, "max_weight": 80}, [10, 40, 70, 80]),
        ({"initial_weight": 5, "step_weight": 5, "max_weight": 20}, [5, 10, 15, 20]),
        ({"initial_weight": 50, "max_weight": 50}, [50]),
        ({"step_weights": [1, 5, 25, 60]}, [1, 5, 25, 60]),
    ],
)
def test_canary_weights(config: dict[str, Any], weights: list[int]) -> None:
    stages = plan(Canary, config)
    assert weights_of(stages) == weights
    # Below 100 %, the promotion still moves all traffic: it is the plan's last stage.
    assert stages.stages[-1].action == "promote"


def test_canary_waits_for_a_person_at_each_step_when_interval_is_none() -> None:
    stages = plan(Canary, {"interval_seconds": None, "analysis": None, "canary_instances": None})
    assert stages.stages[0].params == {"count": None}
    assert outline(stages)[1:4] == [
        ("weight-10", "set_weight", 10, None),
        ("pause-10", "pause", None, None),
        ("weight-30", "set_weight", 30, None),
    ]
    assert not any(s.action == "analysis" for s in stages.stages)


def test_canary_without_interval_analyses_right_after_each_weight() -> None:
    stages = plan(Canary, {"interval_seconds": 0, "step_weights": [50]})
    assert [s.name for s in stages.stages] == [
        "create-canary",
        "weight-50",
        "analysis-50",
        "promote",
    ]


def test_canary_explicit_argo_steps_replace_the_generated_ones() -> None:
    stages = plan(
        Canary,
        {
            "canary_instances": 2,
            "steps": [
                {"set_header_route": {"header": "X-Beta", "value": "on"}},
                {"analysis": {}},
                {"set_weight": 20},
                {"pause": {"seconds": 30}},
                {"analysis": {"count": 10, "failure_limit": 1}},
                {"set_weight": 50},
                {"pause": {}},
                {"pause": {"seconds": None}},
            ],
        },
    )
    assert outline(stages) == [
        ("create-canary", "create_group", None, None),
        ("route-canary", "route", None, None),
        ("analysis-0", "analysis", None, None),
        ("weight-20", "set_weight", 20, None),
        ("pause-20", "pause", None, 30.0),
        ("analysis-20", "analysis", None, None),
        ("weight-50", "set_weight", 50, None),
        ("pause-50", "pause", None, None),
        ("pause-50-2", "pause", None, None),
        ("promote", "promote", None, None),
    ]
    assert stages.stages[0].params == {"count": 2}
    assert stages.stages[1].params == {"header": "X-Beta", "value": "on"}
    assert gate(stages.stages[2]) == AnalysisConfig()
    assert gate(stages.stages[5]).failure_limit == 1


@pytest.mark.parametrize(
    ("config", "fields"),
    [
        ({"surprise": 1}, ["strategy_config.surprise"]),
        ({"initial_weight": -10}, ["strategy_config.initial_weight"]),
        ({"step_weight": 0}, ["strategy_config.step_weight"]),
        ({"max_weight": 101}, ["strategy_config.max_weight"]),
        ({"step_weights": [10, 30, 30]}, ["strategy_config.step_weights"]),
        ({"step_weights": [50, 20]}, ["strategy_config.step_weights"]),
        ({"step_weights": [10, 120]}, ["strategy_config.step_weights.1"]),
        ({"step_weights": []}, ["strategy_config.step_weights"]),
        (
            {"initial_weight": 60, "max_weight": 50},
            ["strategy_config.initial_weight", "strategy_config.max_weight"],
        ),
        ({"step_weights": [10, 50], "max_weight": 80}, ["strategy_config.max_weight"]),
        (
            {"steps": [{"set_weight": 10}], "interval_seconds": 5, "analysis": None},
            ["strategy_config.interval_seconds", "strategy_config.analysis"],
        ),
        ({"steps": [{"set_weight": 10, "pause": {}}]}, ["strategy_config.steps.0"]),
        ({"steps": [{}]}, ["strategy_config.steps.0"]),
        ({"steps": [{"set_weight": 10}, {"setWeight": 20}]}, ["strategy_config.steps.1.setWeight"]),
        ({"steps": [{"pause": {"seconds": -1}}]}, ["strategy_config.steps.0.pause.seconds"]),
        (
            {"steps": [{"set_header_route": {"header": "X-A", "cookie": "b", "value": "1"}}]},
            ["strategy_config.steps.0.set_header_route"],
        ),
        ({"canary_instances": 0}, ["strategy_config.canary_instances"]),
        ({"interval_seconds": -1}, ["strategy_config.interval_seconds"]),
    ],
)
def test_canary_refuses_bad_config_naming_the_field(
    config: dict[str, Any], fields: list[str]
) -> None:
    assert refused(Canary, config) == fields


# -- A/B test ---------------------------------------------------------------------------------


def test_ab_test_default_routes_a_header_and_never_shifts_weight() -> None:
    stages = plan(ABTest)
    assert outline(stages) == [
        ("create-canary", "create_group", None, None),
        ("route-canary", "route", None, None),
        ("analysis", "analysis", None, None),
        ("promote", "promote", None, None),
    ]
    assert stages.stages[0].params == {"count": 1}
    assert stages.stages[1].params == {"header": "X-Canary", "value": "always"}
    assert gate(stages.stages[2]) == AnalysisConfig(count=5)


def test_ab_test_by_cookie_with_iterations_and_a_manual_promotion() -> None:
    stages = plan(ABTest, {"cookie": "beta", "value": "yes", "iterations": 10, "promote": "manual"})
    assert outline(stages) == [
        ("create-canary", "create_group", None, None),
        ("route-canary", "route", None, None),
        ("analysis", "analysis", None, None),
        ("await-promotion", "pause", None, None),
        ("promote", "promote", None, None),
    ]
    assert stages.stages[1].params == {"cookie": "beta", "value": "yes"}
    assert gate(stages.stages[2]).count == 10


def test_ab_test_by_a_named_header() -> None:
    stages = plan(ABTest, {"header": "X-Group", "value": "insiders", "canary_instances": 3})
    assert stages.stages[0].params == {"count": 3}
    assert stages.stages[1].params == {"header": "X-Group", "value": "insiders"}


@pytest.mark.parametrize(
    ("config", "fields"),
    [
        (
            {"header": "X-Group", "cookie": "beta"},
            ["strategy_config.header", "strategy_config.cookie"],
        ),
        ({"value": ""}, ["strategy_config.value"]),
        ({"promote": "later"}, ["strategy_config.promote"]),
        (
            {"iterations": 3, "analysis": {"count": 4}},
            ["strategy_config.iterations", "strategy_config.analysis.count"],
        ),
        ({"analysis": {"count": 0}}, ["strategy_config.analysis.count"]),
    ],
)
def test_ab_test_refuses_bad_config(config: dict[str, Any], fields: list[str]) -> None:
    assert refused(ABTest, config) == fields


# -- analyze ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize(
    ("metrics", "decision", "reason"),
    [
        ({"requests": 100, "success_rate": 0.99, "error_rate": 0.01}, "pass", "every success"),
        ({"requests": 100, "success_rate": 0.5, "error_rate": 0.5}, "fail", "error_rate > 0.1"),
        ({"requests": 0}, "inconclusive", "too few requests"),
        ({"requests": 100, "success_rate": 0.9, "error_rate": 0.05}, "inconclusive", ">= 0.95"),
        ({"requests": 100, "error_rate": 0.0}, "inconclusive", "success_rate was not measured"),
    ],
)
def test_analyze_judges_a_measurement_by_the_stage_gate(
    name: str, metrics: dict[str, float], decision: str, reason: str
) -> None:
    # Given an analysis stage as a plan carries it
    stage = Stage(
        name="analysis-10",
        action="analysis",
        params={**AnalysisConfig().model_dump(mode="json"), "target": "canary"},
    )
    # When one measurement is judged
    verdict = STRATEGIES[name](None, None).analyze(
        AnalysisInput(deployment=spec(), stage=stage, metrics=metrics)
    )
    # Then the verdict follows the gate, with the condition that decided it
    assert verdict.decision == decision
    assert reason in verdict.reason


def test_analyze_uses_the_conditions_of_the_stage() -> None:
    strict = AnalysisConfig.model_validate(
        {"success": [{"metric": "latency_ms_avg", "op": "<", "value": 50}], "failure": []}
    )
    stage = Stage(name="analysis", action="analysis", params={**strict.model_dump(mode="json")})
    judged = [
        Canary()
        .analyze(AnalysisInput(deployment=spec(), stage=stage, metrics={"requests": 9, **m}))
        .decision
        for m in ({"latency_ms_avg": 10.0}, {"latency_ms_avg": 80.0})
    ]
    assert judged == ["pass", "inconclusive"]


def test_analyze_refuses_a_stage_that_is_no_analysis_or_holds_a_bad_gate() -> None:
    with pytest.raises(ValidationFailedError) as caught:
        Canary().analyze(
            AnalysisInput(deployment=spec(), stage=Stage(name="promote", action="promote"))
        )
    assert caught.value.errors[0]["field"] == "stage"
    bad = Stage(name="analysis", action="analysis", params={"count": 0, "target": "canary"})
    with pytest.raises(ValidationFailedError) as caught:
        Canary().analyze(AnalysisInput(deployment=spec(), stage=bad))
    assert caught.value.errors[0]["field"] == "stage.params.count"
