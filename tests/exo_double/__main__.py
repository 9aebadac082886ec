"""``python -m tests.exo_double``: run the EXO test double (a drop-in for the ``exo`` command)."""

import sys

from tests.exo_double.server import main

sys.exit(main())
