"""Placing a pytree on the local devices for a step pmapped over `AXIS`, and fetching it back.

`replicate` gives each leaf a leading [devices] axis, one copy per device, with the sharding a pmapped
step gives its outputs; `unreplicate` takes the first device's copy back to the host.
"""

import jax
import numpy as np

AXIS = "batch"  # the mesh axis name of the pmapped steps (train_lib, self_critical)


def replicate(tree, devices=None):
  """A copy of `tree` on each of `devices` (default: the local devices), leading axis [devices, ...],
  placed as a step pmapped with `AXIS` places its outputs.

  `flax.jax_utils.replicate`'s arrays carry another mesh axis name ("_device_put_sharded" on jax 0.10),
  so the step's second call, fed the first call's outputs, saw a new input sharding and compiled the
  whole train step again.
  """
  devices = list(devices or jax.local_devices())
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                        jax.sharding.PartitionSpec(AXIS))

  def put(leaf):
    # Through the host: `leaf[None]` of a device array would compile an op for each leaf shape.
    leaf = leaf if _is_key(leaf) else np.asarray(leaf)
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + leaf.shape, sharding, [jax.device_put(leaf[None], d) for d in devices])

  return jax.tree_util.tree_map(put, tree)


def _is_key(leaf) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def unreplicate(tree):
  """The first device's copy of a pmapped pytree, as host (numpy) arrays but for PRNG keys.

  `flax.jax_utils.unreplicate` keeps a leading axis when pmap ran on a subset of the local devices;
  `x[0]` on device compiles an op for each leaf shape. Checkpoints are written from the host anyway.
  """
  return jax.tree_util.tree_map(
      lambda x: x[0] if _is_key(x) else np.asarray(x.addressable_shards[0].data)[0], tree)
