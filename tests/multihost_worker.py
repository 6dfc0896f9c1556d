"""One process of the two-process loopback test (launched by tests/test_multihost.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python tests/multihost_worker.py --process_id=0 --num_processes=2 --port=PORT

Joins a `jax.distributed` cluster on 127.0.0.1 with gloo CPU collectives,
builds one global mesh over every process's devices, initialises the params
sharded over it, feeds only the batch rows its own devices hold
(`jax.make_array_from_process_local_data`) and prints the masked token loss
as `LOSS <float>`. The config, batch and loss are module-level so the test
computes the single-process reference from exactly the same definitions.
"""

from __future__ import annotations

import argparse

import numpy as np

import loopback

MESH_SHAPE = (1, 2, 2)  # fsdp spans the two processes, tensor the two local devices
SEED = 0
WEIGHT_SCALE = 10.0
B, T = 4, 11


def model_config():
  from cai_jax.model import MistralConfig
  return MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, sliding_window=5, max_position_embeddings=128)


def global_batch():
  """(tokens, attention_mask, loss_mask), each [B, T] int32; right-padded rows."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 101, (B, T), dtype=np.int32)
  lengths = np.array([T, 7, 9, 5])
  attn = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
  loss_mask = attn.copy()
  loss_mask[:, :3] = 0
  return tokens, attn, loss_mask


def masked_token_loss(params, tokens, attn, loss_mask):
  """Mean next-token cross-entropy over loss_mask == 1 positions."""
  import jax
  import jax.numpy as jnp
  from cai_jax.model import Mistral
  # The std-0.02 init gives near-uniform logits (loss ~ log V whatever the batch);
  # scaling the matrices up makes the loss depend on every row and weight.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * WEIGHT_SCALE, params)
  logits = Mistral(model_config()).apply({"params": params}, tokens, attention_mask=attn)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  m = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.sum(m)


def _local_rows(sharding, global_shape) -> np.ndarray:
  """Batch rows this process's devices hold under `sharding` (its share of the batch)."""
  import jax
  rows = set()
  for device, index in sharding.devices_indices_map(global_shape).items():
    if device.process_index == jax.process_index():
      rows.update(range(*index[0].indices(global_shape[0])))
  return np.array(sorted(rows))


def main(argv=None):
  parser = argparse.ArgumentParser()
  loopback.add_cluster_args(parser)
  args = parser.parse_args(argv)
  jax = loopback.join(args)
  from cai_jax import parallel
  from cai_jax.model import init_params

  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.local_device_count() == 2 and jax.device_count() == 2 * args.num_processes
  mesh = parallel.create_mesh(MESH_SHAPE)
  params, shardings = init_params(model_config(), mesh, jax.random.PRNGKey(SEED))
  batch_s = parallel.batch_sharding(mesh)

  batch = global_batch()
  rows = _local_rows(batch_s, batch[0].shape)
  assert len(rows) == B // args.num_processes, rows  # each process feeds exactly its half
  arrays = [jax.make_array_from_process_local_data(batch_s, x[rows], x.shape) for x in batch]

  with parallel.use_mesh(mesh):
    loss = jax.jit(masked_token_loss, in_shardings=(shardings, batch_s, batch_s, batch_s),
                   out_shardings=parallel.replicated(mesh))(params, *arrays)
  print(f"ROWS {','.join(map(str, rows))}")
  print(f"LOSS {float(loss)!r}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
