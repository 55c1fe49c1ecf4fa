"""The trainer side: the server's model and numerics under autograd and FSDP2 (docs/training.md)."""

from parityrt.train.model import Sample, TrainModel, micro_batches

__all__ = ["Sample", "TrainModel", "micro_batches"]
