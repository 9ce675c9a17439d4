"""Data: the one example type, readers for the QA formats users have, the StepSearch training-set
pipeline, a generated multi-hop world, and the Lightning DataModule."""

from stepsearch.data.schema import Example, GoldenPassage, SubQuestion

__all__ = ["Example", "GoldenPassage", "SubQuestion"]
