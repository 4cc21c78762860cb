"""``python -m dengine`` is the ``dengine`` command."""

import sys

from dengine.cli import main

sys.exit(main())
