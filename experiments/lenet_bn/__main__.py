import sys

from experiments.lenet_bn.main import main

sys.exit(main())
