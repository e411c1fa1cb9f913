"""``python -m fanout bench``: the same as the ``fanout`` command."""

import sys

from fanout.tools.cli import main

sys.exit(main())
