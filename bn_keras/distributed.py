"""Sums over the replicas of a distributed training step, for `synchronized=True`.

Each backend spreads a batch over devices its own way:

- TensorFlow: under a `tf.distribute` strategy (`MirroredStrategy`,
  `MultiWorkerMirroredStrategy`, ...) each replica holds a slice of the global
  batch; the sums are all-reduced in the replica context.
- torch: under `torch.distributed` (one process per device) each process holds
  a slice; the sums are all-reduced with the differentiable
  `torch.distributed.nn.functional.all_reduce`, so gradients flow through the
  global statistics as in `torch.nn.SyncBatchNorm`.
- JAX: under `keras.distribution.DataParallel` the batch is one global array
  sharded over devices, and XLA inserts the collectives for any reduction over
  it: the statistics are already global and nothing is to be done here.
"""

import keras


def num_replicas():
    """How many replicas share the current training step (1 outside one).

    Always 1 on JAX, whose reductions over a sharded batch are global already.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        return 1 if context is None else context.num_replicas_in_sync
    if backend == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return 1


def all_reduce_sum(tensors):
    """Sums each tensor over the replicas of the current step (`num_replicas() > 1`)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        return list(context.all_reduce(tf.distribute.ReduceOp.SUM, list(tensors)))
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    return [all_reduce(t, op=dist.ReduceOp.SUM) for t in tensors]
