"""``python -m UNet3DSegmentLib``: the same command line as ``unet3d-segment``."""

import sys

from UNet3DSegmentLib.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
