"""Pose-transfer data: the anny generator, published-layout readers and training samples."""
from .datasets import (
    MeshDataset,
    SupervisedPairs,
    TestPairs,
    UnlabelledTriplets,
    open_dataset,
    read_published,
    semi_supervised_split,
)

__all__ = ["MeshDataset", "SupervisedPairs", "TestPairs", "UnlabelledTriplets", "open_dataset",
           "read_published", "semi_supervised_split"]
