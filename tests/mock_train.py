"""`python -m tlkeras.train` on tfds mock data, for tests that need real processes.

MOCK_EXAMPLES=24 python tests/mock_train.py --run-dir DIR --set ...
"""

import os
import sys

import tensorflow_datasets as tfds

from tlkeras.train import main

if __name__ == "__main__":
    with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_EXAMPLES", "24"))):
        sys.exit(main(sys.argv[1:]))
