"""``python -m gradscope``: the same as the ``gradscope`` console script."""

import sys

from gradscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
