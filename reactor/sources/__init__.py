"""Where events come from: QMP sessions to VMs, and the envelope they become.

``discovery`` parses socket addresses and globs; ``session`` is one QMP
connection's reader (greeting, capabilities, commands, events); ``vm`` is one
VM (reconnects, the envelope, ``REACTOR_CONNECTED``/``DISCONNECTED``);
``caused_by`` marks events that follow our own commands; ``manager`` owns every
VM connection; ``server`` accepts QEMUs that connect to us (``--listen``).

Layer 3: imports the foundation only; it knows nothing of rules or actions.
"""
