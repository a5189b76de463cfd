"""``python -m moeut.cli`` = ``moeut``."""

import sys

from moeut.cli import main

sys.exit(main())
