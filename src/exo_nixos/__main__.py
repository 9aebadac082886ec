import sys

from exo_nixos.cli import main

sys.exit(main())
