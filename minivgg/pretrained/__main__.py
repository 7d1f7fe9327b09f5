"""`python -m minivgg.pretrained convert IN OUT`: see `minivgg.pretrained.cli`."""

import sys

from minivgg.pretrained.cli import main

if __name__ == "__main__":
    sys.exit(main())
