"""`python -m ioisray ...` is `ioisray ...`."""
import sys

from ioisray.cli import main

sys.exit(main())
