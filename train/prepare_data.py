"""The launcher the README names: `python train/prepare_data.py [flags]`.

The code is phi_train/prepare_data.py (installed with the package, also as the console script
`phi-prepare-data`); this file only runs it, so the command works from a checkout.
"""
import sys

from phi_train.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
