"""Per-program XLA compiler options.

On CPU, XLA (jaxlib 0.10) hands matrix multiplies and reductions to YNNPACK.
For programs that take gradients, having it fuse each dot with the elementwise
math around it (`LIBRARY_FUSION_TYPE_DOT`, plus `_REDUCE` for the reductions
of the norms) avoids a slow path of the default: the backward's elementwise
math (SwiGLU, the softmax) gets fused into the transposing copies that feed
the weight-gradient matmuls, and inside the layer scan those copies run ~20x
below memory speed. Measured on the `small` preset (2 cores): forward+backward
8x256 +10-20%, the SFT step ~+10%. The same setting makes decoding 3-4x
*slower*, so it is passed to the gradient programs only
(`jax.jit(..., compiler_options=...)`), never through the process-wide XLA_FLAGS.
"""

from __future__ import annotations

import functools

from absl import logging

_CPU_GRADIENT_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type",
                          "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"),)


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
  import jax
  import jax.numpy as jnp
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(_CPU_GRADIENT_OPTIONS)).lower(
        jnp.zeros((), jnp.float32)).compile()
  except Exception as e:  # an XLA without the option: keep its defaults
    logging.info("XLA rejects %s (%s); gradient programs use the defaults",
                 dict(_CPU_GRADIENT_OPTIONS), e)
    return False
  return True


def gradient_program_options() -> dict | None:
  """`compiler_options` for a jitted program that computes gradients, or None.

  Set only when the default backend is CPU and this XLA knows the option.
  """
  import jax
  if jax.default_backend() != "cpu" or not _cpu_options_supported():
    return None
  return dict(_CPU_GRADIENT_OPTIONS)
