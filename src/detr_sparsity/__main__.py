import sys

from detr_sparsity.cli import main

sys.exit(main())
