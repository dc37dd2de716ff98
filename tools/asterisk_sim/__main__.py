"""`python -m tools.asterisk_sim`: the same as `callerid-asterisk-sim`."""

import sys

from tools.asterisk_sim.cli import main

sys.exit(main())
