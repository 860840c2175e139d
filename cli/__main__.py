"""`python -m cli`: the same as the `dalle-farm` console script."""

import sys

from cli.main import main

sys.exit(main())
