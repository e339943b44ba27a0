import sys

from pathology.cli import main

sys.exit(main())
