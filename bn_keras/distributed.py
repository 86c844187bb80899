"""Sums over the replicas of a distributed training step, for `synchronized=True`.

Each backend spreads a batch over devices its own way:

- TensorFlow: under a `tf.distribute` strategy (`MirroredStrategy`,
  `MultiWorkerMirroredStrategy`, ...) each replica holds a slice of the global
  batch; the sums are all-reduced in the replica context.
- torch: under `torch.distributed` (one process per device) each process holds
  a slice; the sums are all-reduced with a differentiable all-reduce (the
  functional collective, or `torch.distributed.nn.functional.all_reduce` on a
  torch that gives the former no gradient), so gradients flow through the
  global statistics as in `torch.nn.SyncBatchNorm`.
- JAX: under `keras.distribution.DataParallel` the batch is one global array
  sharded over devices, and XLA inserts the collectives for any reduction over
  it: the statistics are already global and nothing is to be done here.
"""

import functools

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
    import torch

    # One collective for all the tensors (of one dtype): one network round
    # trip per call, not one per tensor.
    tensors = list(tensors)
    summed = _torch_all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    sizes = [t.numel() for t in tensors]
    return [
        part.reshape(t.shape)
        for part, t in zip(torch.split(summed, sizes), tensors, strict=True)
    ]


def _torch_all_reduce_sum(tensor):
    import torch.distributed as dist

    if _functional_all_reduce_is_differentiable():
        from torch.distributed import _functional_collectives as funcol

        reduced = funcol.all_reduce(tensor, "sum", dist.group.WORLD)
        return funcol.wait_tensor(reduced)
    # Older torch: the functional collective has no gradient, this one does;
    # newer torch deprecates it (a FutureWarning) for the other.
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


@functools.cache
def _functional_all_reduce_is_differentiable():
    """Whether torch registers a gradient for the functional all-reduce."""
    # Importing the module registers the gradients of its collectives.
    import torch.distributed._functional_collectives

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "_c10d_functional::all_reduce", "Autograd"
        )
    except (AttributeError, RuntimeError):
        return False
