import sys

from experiments.shift.main import main

sys.exit(main())
