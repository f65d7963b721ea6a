"""The fleet: sidecars publish to NATS JetStream, answer commands, and a central instance
runs rules over every host's events (``docs/fleet.md``).

``subjects`` names subjects and message ids, ``link`` connects (with the
configured credentials), ``outbox`` keeps what waits to be published in its own
SQLite file, ``publisher`` drains it, ``commands`` answers and sends commands,
``central`` consumes the stream, and ``attach`` builds what a configuration asks
for as ``reactor.service.companion.Companion``\\ s.
"""
