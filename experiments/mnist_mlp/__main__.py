import sys

from experiments.mnist_mlp.main import main

sys.exit(main())
