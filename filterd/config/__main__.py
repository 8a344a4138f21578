"""`python -m filterd.config`: print docs/configuration.md as the code describes it; `--write` rewrites the file."""

import sys

from filterd.config.reference import main

sys.exit(main())
