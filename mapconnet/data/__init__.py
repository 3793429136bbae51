"""Pose-transfer data: the anny generator, published-layout readers and training samples.

    from mapconnet.data import open_dataset, SupervisedPairs
    ds = open_dataset("data/demo")                      # memory-mapped (I, P, V, 3)
    train = SupervisedPairs(ds, ds.train_identities, ds.train_poses, length=1000, seed=0)

Generate a dataset with `python -m mapconnet.data.generate --help`.
"""
from mapconnet.meshio import load_mesh, save_mesh

from .datasets import (
    MeshDataset,
    SupervisedPairs,
    TestPairs,
    UnlabelledTriplets,
    open_dataset,
    semi_supervised_split,
)
from .readers import read_mesh_folder, read_npt_folder, read_smal_folder

__all__ = ["MeshDataset", "SupervisedPairs", "TestPairs", "UnlabelledTriplets", "load_mesh", "open_dataset",
           "read_mesh_folder", "read_npt_folder", "read_smal_folder", "save_mesh", "semi_supervised_split"]
