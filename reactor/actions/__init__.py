"""Action types: the interface (``base``), the built-ins (one module each), and their helpers."""
