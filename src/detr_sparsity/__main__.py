import sys

from detr_sparsity.job_server import run_on_server

# Under a local Snakemake run, the job server runs this command in a child that has torch, transformers and MLflow
# imported already (job_server.py); elsewhere, or where it cannot, the command runs here.
code = run_on_server(sys.argv)
if code is None:
    from detr_sparsity.cli import job

    code = job()
sys.exit(code)
