"""The built-in action types, one module each; helpers are private (``_vmcall``).

Built-ins are plugins like any other: each module implements
``reactor_register_actions`` and is named in ``reactor.plugins.manager.BUILTIN_PLUGINS``.

Layer 7: imports the foundation, ``reactor.plugins`` and ``reactor.params``.
"""
