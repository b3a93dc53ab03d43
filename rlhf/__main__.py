import sys

from rlhf.cli import entry_point

sys.exit(entry_point())
