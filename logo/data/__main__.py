"""``python -m logo.data build ...``: the LOGO data builder (see logo.data.builder)."""
import sys

from .builder import main

if __name__ == "__main__":
    sys.exit(main())
