import sys

from dpo.cli import main

sys.exit(main())
