"""`python -m intruder ...`: the same as the `intruder` command."""

import sys

from .cli import main

sys.exit(main())
