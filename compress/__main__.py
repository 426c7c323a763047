import sys

from compress.run.cli import main

sys.exit(main())
