import sys

from compress.workflow.cli import main

sys.exit(main())
