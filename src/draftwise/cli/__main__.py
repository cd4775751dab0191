"""``python -m draftwise.cli``: the ``draftwise`` command."""

import sys

from draftwise.cli import main

sys.exit(main())
