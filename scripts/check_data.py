"""The data doctor: scan an ImageFolder dataset and report what would hurt training.

python scripts/check_data.py DATASET [--json]    # exit 0 usable as is, 1 errors, 2 bad path
"""

import sys

from alexnet_lit.data.doctor import check_data_main

if __name__ == "__main__":
    sys.exit(check_data_main())
