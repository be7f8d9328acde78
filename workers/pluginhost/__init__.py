"""The plugin host: discovery, trust, dependencies, loading, serving and calling plugins.

It owns the contracts of every plugin type and the one path of a plugin call
(:func:`workers.pluginhost.calls.invoke`). Built on the engine and the runtime.
"""

__all__: list[str] = []
