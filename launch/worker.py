"""The script launchers hand to each worker process (msrun and friends take a file, not a module)."""
import sys

from vit_dist.cli import main

sys.exit(main())
