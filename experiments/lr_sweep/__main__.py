import sys

from experiments.lr_sweep.main import main

sys.exit(main())
