import sys

from dinb.cli import main

sys.exit(main())
