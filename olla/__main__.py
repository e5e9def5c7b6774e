import sys

from olla.cli import main

sys.exit(main())
