import sys

from launchgate.cli import main

sys.exit(main())
