"""``python -m dualenc_fast ...``: the ``dualenc`` command line, also the entry point for
``torchrun --standalone --nproc-per-node N -m dualenc_fast train ...``."""
import sys

from dualenc_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
