import sys

from sft.cli import main

sys.exit(main())
