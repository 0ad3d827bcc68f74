import sys

from biopsy.cli import main

sys.exit(main())
