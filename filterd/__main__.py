import sys

from filterd.cli import main

sys.exit(main())
