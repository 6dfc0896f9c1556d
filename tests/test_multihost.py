"""Two processes x two CPU devices on loopback (jax.distributed + gloo) == one process.

This runs the real multi-host code path: a coordinator, a global mesh whose
'fsdp' axis spans both processes, params initialised straight onto it, and a
batch that each process supplies only its own rows of.
"""

from __future__ import annotations

import jax
import numpy as np

import loopback
import multihost_worker as worker

NUM_PROCESSES = 2


def _single_process_loss() -> float:
  import flax.linen as nn
  import jax.numpy as jnp
  from cai_jax.model import Mistral
  model = Mistral(worker.model_config())
  params = nn.unbox(model.init(jax.random.PRNGKey(worker.SEED), jnp.zeros((1, 1), jnp.int32)))
  return float(jax.jit(worker.masked_token_loss)(params["params"], *worker.global_batch()))


def test_two_process_loss_matches_single_process():
  outs = loopback.run_workers(worker.__file__, [], num_processes=NUM_PROCESSES, timeout=120)

  def field(out, key):
    return next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(key + " "))

  rows = [field(out, "ROWS") for out in outs]
  assert sorted(rows) == ["0,1", "2,3"]  # each process fed a different half
  losses = [float(field(out, "LOSS")) for out in outs]
  assert losses[0] == losses[1]  # one replicated value, seen by both
  ref = _single_process_loss()
  np.testing.assert_allclose(losses[0], ref, atol=1e-5, rtol=0)
