"""``python -m smpart.bench.decode``: the decode loop's command line."""

import sys

from .cli import main

sys.exit(main())
