"""``qmp-reactor demo``: a throwaway QEMU, its QMP driver, and the demo that drives it.

``machine`` is a self-contained QEMU driver in the spirit of QEMU's own
``python/qemu/machine``: a blocking QMP client (``QmpDriver``) and a QEMU in a
temporary directory (``ThrowawayQemu``) with a serial console; standard library
only, used by the demo and the tests. ``run`` is the demo itself.

Layer 9: may import every layer below it (not ``reactor.cli``).
"""
