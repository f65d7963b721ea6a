"""From firings to finished actions: the journal, group commit, attempts, retries.

``invocation`` is one action of one firing; ``schema`` and ``journal`` keep
invocations in SQLite before they run; ``groupcommit`` batches the writes;
``deadlines`` and ``attempts`` run one invocation to its end with timeouts and
tenacity retries; ``dispatcher`` turns firings into invocations and runs them
in lanes by rule mode.

Layer 6: imports the foundation, ``reactor.plugins`` and ``reactor.params``.
"""
