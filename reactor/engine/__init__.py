"""Matching in time: a pure, clock-driven function from envelopes to firings.

``routes`` generates one Python function per event name from the rule set;
``windowsets`` and ``gates`` hold QEMU's rate-limit stage, thresholds and
throttles; ``core`` is the engine that joins them; ``replay`` runs it over
recorded events on a virtual clock. No I/O happens here.

Layer 5: imports the foundation and ``reactor.rules``.
"""
