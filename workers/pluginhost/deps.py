"""Check plugins against each other and cul8er's plugin API, and order them for loading."""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from graphlib import CycleError, TopologicalSorter
from typing import TYPE_CHECKING

from workers.runtime.errors import PluginError

if TYPE_CHECKING:
    from schemas.manifest import Manifest, Requirement

__all__ = ["load_order"]


def load_order(
    manifests: list[Manifest], *, api_version: str, installed: dict[str, str] | None = None
) -> list[Manifest]:
    """Plugins in load order (dependencies first, ties by name) once every rule holds.

    ``installed`` maps plugin names to versions already present outside ``manifests``;
    they satisfy requirements and trigger conflicts but are not ordered or returned.

    Raises:
        PluginError: a plugin needs another API version, misses a dependency or has it in the
            wrong version, conflicts with a present plugin, or sits on a dependency cycle.
    """
    by_name = _by_name(manifests)
    present = {**(installed or {}), **{m.name: m.version for m in manifests}}
    for manifest in sorted(manifests, key=lambda m: m.name):
        _check_api(manifest, api_version)
        _check_requires(manifest, present)
        _check_conflicts(manifest, present)
    return [by_name[name] for name in _topological(by_name)]


def _by_name(manifests: list[Manifest]) -> dict[str, Manifest]:
    by_name: dict[str, Manifest] = {}
    for manifest in manifests:
        if manifest.name in by_name:
            raise PluginError(
                f"plugin {manifest.name!r} is listed twice "
                f"({by_name[manifest.name].version} and {manifest.version})",
                plugin_name=manifest.name,
            )
        by_name[manifest.name] = manifest
    return by_name


def _check_api(manifest: Manifest, api_version: str) -> None:
    if not manifest.supports_api(api_version):
        raise PluginError(
            f"plugin {manifest.name!r} supports cul8er plugin API {manifest.api} "
            f"but this is {api_version}",
            plugin_name=manifest.name,
        )


def _check_requires(manifest: Manifest, present: Mapping[str, str]) -> None:
    for need in manifest.requires:
        version = present.get(need.name)
        if version is None:
            wanted = f" ({need.versions})" if need.versions else ""
            raise PluginError(
                f"plugin {manifest.name!r} requires {need.name!r}{wanted}, which is not installed",
                plugin_name=manifest.name,
            )
        if not need.allows(version):
            raise PluginError(
                f"plugin {manifest.name!r} requires {need.name!r} {need.versions} "
                f"but {version} is installed",
                plugin_name=manifest.name,
            )


def _check_conflicts(manifest: Manifest, present: Mapping[str, str]) -> None:
    # Every manifest's own conflicts are checked, so a conflict declared by either side of a
    # pair refuses the pair: conflicts apply both ways.
    for other in manifest.conflicts:
        version = present.get(other.name)
        if version is not None and other.name != manifest.name and other.allows(version):
            raise PluginError(
                f"plugin {manifest.name!r} conflicts with {_describe(other)}, "
                f"and {other.name} {version} is installed",
                plugin_name=manifest.name,
            )


def _describe(requirement: Requirement) -> str:
    if requirement.versions:
        return f"{requirement.name!r} {requirement.versions}"
    return repr(requirement.name)


def _graph(by_name: Mapping[str, Manifest]) -> dict[str, list[str]]:
    """Plugin name → the names it requires among the plugins being ordered, sorted."""
    return {
        name: sorted({need.name for need in manifest.requires if need.name in by_name})
        for name, manifest in by_name.items()
    }


def _topological(by_name: Mapping[str, Manifest]) -> list[str]:
    graph = _graph(by_name)
    sorter = TopologicalSorter(graph)
    try:
        sorter.prepare()
    except CycleError as exc:
        chain = _cycle(graph, set(exc.args[1]))
        raise PluginError(f"dependency cycle: {' -> '.join(chain)}", plugin_name=chain[0]) from exc
    # Take the smallest ready name each time, not whole batches: one stable order, whatever
    # the order of ``manifests``.
    order: list[str] = []
    ready: list[str] = []
    while sorter.is_active():
        for name in sorter.get_ready():
            heapq.heappush(ready, name)
        name = heapq.heappop(ready)
        order.append(name)
        sorter.done(name)
    return order


def _cycle(graph: Mapping[str, list[str]], nodes: set[str]) -> list[str]:
    """The cycle through the smallest of ``nodes``, along "requires" edges, start repeated."""
    start = min(nodes)
    path = [start]
    seen = {start}

    def walk(node: str) -> bool:
        for nxt in graph[node]:
            if nxt == start:
                path.append(start)
                return True
            if nxt in nodes and nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                if walk(nxt):
                    return True
                path.pop()
        return False

    # graphlib reports nodes that do lie on one cycle, so the walk always closes it.
    walk(start)
    return path
