import sys

from np_jax.cli import main

sys.exit(main())
