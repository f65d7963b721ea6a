"""Action parameters: Jinja2 templates in a sandbox, secret references, validation.

A library layer below the pipeline: the rule compiler uses it to check a rule's
``with:`` at load time, the dispatcher to render it at run time. Nothing here
knows about QMP, rules or the journal.

Layer 2: imports the foundation and ``reactor.plugins``.
"""
