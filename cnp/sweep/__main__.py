"""``python -m cnp.sweep``."""

import sys

from cnp.sweep.cli import main

sys.exit(main())
