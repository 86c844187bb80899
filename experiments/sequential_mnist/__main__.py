import sys

from experiments.sequential_mnist.main import main

sys.exit(main())
