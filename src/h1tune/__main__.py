"""`python -m h1tune ...` is the `h1tune` command, so launchers can start it as a module:

    accelerate launch -m h1tune train run.yaml        torchrun --nproc-per-node 8 -m h1tune train run.yaml
"""

import sys

from h1tune.cli import main

sys.exit(main())
