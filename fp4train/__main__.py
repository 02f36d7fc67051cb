"""``python -m fp4train``: the ``fp4train`` command (also under ``torchrun -m fp4train``)."""

import sys

from fp4train.cli import main

if __name__ == "__main__":
    sys.exit(main())
