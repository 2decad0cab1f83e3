import sys

from vit_dist.cli import main

sys.exit(main())
