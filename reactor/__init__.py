"""qmp-reactor: a rule-based reaction engine for QEMU's QMP events."""

__version__ = "0.1.0"
