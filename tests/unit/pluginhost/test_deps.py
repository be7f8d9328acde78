"""Plugin load order: API range, requirements, conflicts and cycles."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.manifest import Manifest
from workers.pluginhost.deps import load_order
from workers.runtime.errors import PluginError


def manifest(name: str, version: str = "1.0.0", **fields: Any) -> Manifest:
    def reqs(value: dict[str, str]) -> list[dict[str, str]]:
        return [{"name": n, "versions": v} for n, v in value.items()]

    for key in ("requires", "conflicts"):
        if key in fields:
            fields[key] = reqs(fields[key])
    return Manifest.model_validate(
        {"name": name, "version": version, "type": "observer", "module": f"p_{name}", **fields}
    )


def names(manifests: list[Manifest]) -> list[str]:
    return [m.name for m in manifests]


def test_diamond_dependencies_come_first_and_ties_are_broken_by_name():
    # Given a diamond: top requires left and right, both require base; plus a lone plugin
    base = manifest("base")
    left = manifest("left", requires={"base": ">=1"})
    right = manifest("right", requires={"base": ""})
    top = manifest("top", requires={"left": "", "right": ">=1,<2"})
    lone = manifest("alone")

    # When ordering them given in two different orders
    first = load_order([top, right, left, base, lone], api_version="1.0")
    second = load_order([lone, base, left, right, top], api_version="1.0")

    # Then dependencies come first, and the order is the same both times
    assert names(first) == ["alone", "base", "left", "right", "top"]
    assert names(second) == names(first)


def test_an_installed_plugin_satisfies_a_requirement_without_being_ordered():
    # Given a plugin requiring one that is installed already
    user = manifest("user", requires={"core": ">=2"})

    # When ordering it
    order = load_order([user], api_version="1.0", installed={"core": "2.1.0"})

    # Then it loads alone
    assert names(order) == ["user"]


def test_missing_dependency_is_refused():
    # Given a plugin requiring one nobody provides
    x = manifest("x", requires={"y": ">=1,<2"})

    # When ordering it
    with pytest.raises(PluginError) as err:
        load_order([x], api_version="1.0")

    # Then the error names both, with the range
    assert err.value.plugin_name == "x"
    assert str(err.value) == "plugin 'x' requires 'y' (>=1,<2), which is not installed"


def test_dependency_in_the_wrong_version_is_refused():
    # Given a plugin requiring y >=2 while y 1.4.0 is present
    x = manifest("x", requires={"y": ">=2"})
    y = manifest("y", "1.4.0")

    # When ordering them
    with pytest.raises(PluginError) as err:
        load_order([x, y], api_version="1.0")

    # Then the error says which version is there
    assert err.value.plugin_name == "x"
    assert str(err.value) == "plugin 'x' requires 'y' >=2 but 1.4.0 is installed"


@pytest.mark.parametrize("given", [["x", "y"], ["y", "x"]])
def test_conflict_is_refused_whichever_order(given: list[str]):
    # Given x declaring a conflict with y <2, and y 1.4.0
    plugins = {"x": manifest("x", conflicts={"y": "<2"}), "y": manifest("y", "1.4.0")}

    # When ordering them in either order
    with pytest.raises(PluginError) as err:
        load_order([plugins[n] for n in given], api_version="1.0")

    # Then the conflict is reported
    assert err.value.plugin_name == "x"
    assert str(err.value) == "plugin 'x' conflicts with 'y' <2, and y 1.4.0 is installed"


def test_conflict_declared_by_the_installed_side_also_refuses():
    # Given y (being loaded) declaring a conflict with x, which is installed already
    y = manifest("y", "1.4.0", conflicts={"x": ""})

    # When ordering y with x installed
    with pytest.raises(PluginError) as err:
        load_order([y], api_version="1.0", installed={"x": "0.1.0"})

    # Then the pair is refused from y's side
    assert err.value.plugin_name == "y"
    assert str(err.value) == "plugin 'y' conflicts with 'x', and x 0.1.0 is installed"


def test_conflict_outside_the_range_is_allowed():
    # Given x conflicting with y <2 but y is 2.0.0
    x = manifest("x", conflicts={"y": "<2"})
    y = manifest("y", "2.0.0")

    # When ordering them
    order = load_order([x, y], api_version="1.0")

    # Then both load
    assert names(order) == ["x", "y"]


def test_three_node_cycle_names_the_whole_chain():
    # Given a -> b -> c -> a, plus an innocent plugin
    a = manifest("a", requires={"b": ""})
    b = manifest("b", requires={"c": ""})
    c = manifest("c", requires={"a": ""})
    d = manifest("d")

    # When ordering them
    with pytest.raises(PluginError) as err:
        load_order([c, d, b, a], api_version="1.0")

    # Then the message walks the chain along the requirements
    assert str(err.value) == "dependency cycle: a -> b -> c -> a"
    assert err.value.plugin_name == "a"


def test_api_range_not_met_is_refused():
    # Given a plugin for API 2 and later
    x = manifest("x", api=">=2")

    # When ordering it under API 1.0
    with pytest.raises(PluginError) as err:
        load_order([x], api_version="1.0")

    # Then the error names both ranges
    assert err.value.plugin_name == "x"
    assert str(err.value) == "plugin 'x' supports cul8er plugin API >=2 but this is 1.0"


def test_same_name_twice_is_refused():
    # Given two manifests of one plugin
    # When ordering them
    with pytest.raises(PluginError) as err:
        load_order([manifest("x"), manifest("x", "1.1.0")], api_version="1.0")

    # Then the duplicate is named
    assert err.value.plugin_name == "x"
