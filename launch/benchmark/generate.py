"""The generate mode: greedy decode, cai_jax's sampler vs transformers `generate`."""

from __future__ import annotations

import numpy as np

from launch.benchmark.hardware import decode_step_floor
from launch.benchmark.report import row
from launch.benchmark.timing import log, median, time_calls
from launch.benchmark.torch_ref import Setup, import_torch
from launch.benchmark.workload import Shapes, random_tokens


def measure(setup: Setup, shapes: Shapes, reps: int, ceilings: dict) -> dict:
  """Greedy decode of exactly `gen_new` tokens after `gen_prompt`-token prompts.

  TTFT is the time of a 1-token generation (prefill + first token); decode
  tok/s = B * (N - 1) / (t_N - t_1), which leaves the prefill out of the rate.
  The floor is `decode_step_floor` at the mean context P + N/2 (GPU: the HBM roofline).
  On a GPU, transformers' eager decode of a 7B model takes ~20 s per call: it is
  warmed up on 2 tokens and timed once (`reps` calls on CPU).
  """
  from cai_jax import sampling
  cfg, params = setup.config, setup.params
  P, N = shapes.gen_prompt, shapes.gen_new
  device = setup.device
  gpu = device == "gpu"
  torch, _ = import_torch()
  results, rows = {}, []
  prompts_by_batch = {B: random_tokens(10 + B, (B, P), cfg.vocab_size)
                      for B in shapes.gen_batches}
  ours_tokens = {}

  for B, prompts in prompts_by_batch.items():
    plist = prompts.tolist()

    def ours(n, plist=plist):  # n=1 runs the same N-step program, stopping after one token
      return sampling.generate(cfg, params, plist, max_new_tokens=n, greedy=True, min_steps=N)

    log(f"generate: cai_jax b{B}")
    t1 = time_calls(lambda: ours(1), reps)
    tn = time_calls(lambda: ours(N), reps)
    setup.profile(f"generate_b{B}", lambda: ours(N))
    out = ours(N)
    if any(len(t) != N for t in out.tokens):
      raise RuntimeError(f"cai_jax generated {[len(t) for t in out.tokens]} tokens, not {N}")
    ours_tokens[B] = np.asarray(out.tokens)
    results[B] = {"cai_jax_t1": t1, "cai_jax_tN": tn}

  model = setup.torch_lm(train=False, bf16_weights=gpu)
  torch_reps = 1 if gpu else reps
  for B, prompts in prompts_by_batch.items():
    ids = torch.as_tensor(prompts, dtype=torch.long, device=setup.torch_device)
    mask = torch.ones_like(ids)

    def ref(n, ids=ids, mask=mask):
      with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
      setup.sync()
      return out

    log(f"generate: transformers b{B}")
    ref(2)
    t1 = time_calls(lambda: ref(1), torch_reps, warmup=0)
    tn = time_calls(lambda: ref(N), torch_reps, warmup=0)
    out = ref(N)[:, P:].cpu().numpy() if not gpu else None
    if out is not None and out.shape[1] != N:
      raise RuntimeError(f"transformers generated {out.shape[1]} tokens, not {N}")
    res = results[B]
    res.update(torch_t1=t1, torch_tN=tn)
    if out is not None:  # same weights on both sides only in the CPU mode
      res["greedy_token_agreement"] = float(np.mean(out == ours_tokens[B]))
    ours_t1, ours_tn = median(res["cai_jax_t1"]), median(res["cai_jax_tN"])
    ref_t1, ref_tn = median(t1), median(tn)
    floor_s = decode_step_floor(cfg, B, P + N / 2, ceilings)
    ours_step = max(ours_tn - ours_t1, 1e-9) / (N - 1)
    res.update(ms_per_step=1e3 * ours_step, floor_ms_per_step=1e3 * floor_s,
               fraction_of_floor=floor_s / ours_step)
    rows.append(row("generate", f"decode tok/s b{B}", "tok/s",
                    B * (N - 1) / max(ours_tn - ours_t1, 1e-9),
                    B * (N - 1) / max(ref_tn - ref_t1, 1e-9), floor=B / floor_s, device=device))
    rows.append(row("generate", f"TTFT ms b{B}", "ms", 1e3 * ours_t1, 1e3 * ref_t1,
                    higher_is_better=False, device=device))
  del model
  return {"prompt_len": P, "new_tokens": N, "decode_loop": "unroll" if cfg.unrolls_decode()
          else "scan", "weights": cfg.param_dtype,
          "seconds": {f"b{B}": v for B, v in results.items()}, "rows": rows}
