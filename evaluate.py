"""Evaluate a pose-transfer checkpoint on a dataset's test lists (PMD, Chamfer, reference rows).

    python evaluate.py --checkpoint runs/demo/checkpoint.pt --data data/demo --out runs/demo/eval
    python evaluate.py --checkpoint pretrained --data data/published-lite --out runs/pretrained-eval

The work lives in `mapconnet.evaluation` (also `python -m mapconnet.evaluation`); see its docs.
"""
from mapconnet.evaluation import cli

if __name__ == "__main__":
    cli()
