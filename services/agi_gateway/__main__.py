import sys

from agi_gateway.app import main

sys.exit(main())
