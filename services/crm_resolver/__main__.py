import sys

from crm_resolver.app import main

sys.exit(main())
