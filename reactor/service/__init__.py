"""The running sidecar: configuration, wiring, the daemon, metrics, logs.

``config`` reads the configuration file; ``loader`` says where rules come from;
``generation`` loads everything a configuration produces as one immutable
whole (``run``, ``check``, ``replay`` and ``demo`` share it); ``render`` renders
an invocation's parameters; ``reactor`` wires engine, dispatcher, journal and
plugins together; ``daemon`` is ``qmp-reactor run`` (signals, reloads,
connections); ``metrics`` serves ``/metrics`` and ``/healthz``; ``logs`` sets up
logging; ``permissions`` warns about files others can write; ``execute`` runs a
replay's actions for real.

Layer 8: may import every layer below it (not ``reactor.demo`` or ``reactor.cli``).
"""
