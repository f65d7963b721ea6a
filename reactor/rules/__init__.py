"""Rule files: YAML with locations, the compiler, conditions and paths, the catalog.

``yamlload`` reads YAML keeping every node's place; ``catalog`` is QEMU's event
catalog; ``paths`` and ``conditions`` compile JSONPaths and conditions once;
``options`` parses a rule's throttle, threshold and mode; ``compiler`` turns
files into frozen ``Rule`` objects with ``FILE:LINE:COL`` diagnostics;
``ruleset`` indexes them by event name; ``lint`` finds rules that load but
cannot fire.

Layer 4: imports the foundation, ``reactor.plugins`` and ``reactor.params``
(to validate actions' parameters at load time).
"""
