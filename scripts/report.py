"""Rebuild a run's report.html (one self-contained page) from its folder.

python scripts/report.py lightning_logs/version_N
"""

import sys

from alexnet_lit.evaluation.run_page import report_main

if __name__ == "__main__":
    sys.exit(report_main())
