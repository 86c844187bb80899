import sys

from experiments.perils.main import main

sys.exit(main())
