import sys

from detr_sparsity.cli import job

sys.exit(job())
