"""The plugin API and its host: what a plugin imports, the hooks, the manager.

``api`` is the contract an action type implements (``ActionType``,
``ActionContext``, ``ActionParams``); ``hookspecs`` declares the hooks and the
``hookimpl`` marker; ``manager`` finds plugins (built-ins, entry points, drop-in
files) and wraps the hooks in typed methods. Plugins import these names from
``reactor`` itself (``from reactor import hookimpl, ActionType``).

Layer 1: imports only the foundation (``reactor.errors``, ``model``, ``clock``,
``durations``). The built-in actions are named by module path in
``manager.BUILTIN_PLUGINS`` and imported when a manager is built, as entry
points are, so this layer never imports ``reactor.actions`` itself.
"""
