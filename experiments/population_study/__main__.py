import sys

from experiments.population_study.main import main

sys.exit(main())
