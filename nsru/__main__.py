"""``python -m nsru``: the same as the ``nsru`` command."""

import sys

from nsru.cli import main

sys.exit(main())
