"""``python -m reactor``: the same as the ``qmp-reactor`` command."""

import sys

from reactor.cli import main

sys.exit(main())
