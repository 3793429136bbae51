"""Train MAPConNet: supervised, unsupervised or semi-supervised, from a dataset folder or a stream.

    python train.py                                     # demo: data/demo (built if missing), minutes on CPU
    python train.py --data stream --val-data DIR        # fresh anny bodies every step
    python train.py --data DIR --out DIR --epochs 200   # supervised on a dataset folder
    python train.py --percentage 0 --use-unlabelled     # unsupervised
    python train.py --percentage 50 --use-unlabelled    # semi-supervised
    python train.py ... --resume                        # continue exactly where OUT/checkpoint.pt stopped

The loop lives in `mapconnet.training` (also `python -m mapconnet.training`), the terms of each
step in `mapconnet.objective`; `python train.py --help` lists every option.
"""
from mapconnet.training import cli

if __name__ == "__main__":
    cli()
