"""Side-by-side benchmarks: cai_jax against its PyTorch references, in one process.

`python -m launch.benchmark` is the entry point (`__main__.py`: flags, thread pinning);
`suite.run` runs the chosen modes so a test can run each of them on a tiny model. Every
mode runs cai_jax and the reference on the same config, batch, lengths and the *same
random weights*: a `transformers.MistralForCausalLM` is drawn at roughly unit activation
scale (HF's 0.02 init gives near-flat logits, which would make greedy decoding
degenerate), saved with `save_pretrained`, and loaded into cai_jax with
`checkpoint.load_hf` (`torch_ref.py`). Absolute times drift between runs and machines, so
only the ratio measured in one run means much (BENCHMARKS.md).

Modes, one module each (`workload.Shapes` holds the sizes; the defaults are BENCHMARKS.md's):
  model     forward and forward+backward of a batch, tokens/s and achieved FLOP/s
            (jitted `Mistral.apply` vs torch no_grad forward / `loss.backward()`).
  attention causal attention alone at the model's heads, B/2 x T of the model mode:
            `jax.nn.dot_product_attention` (xla; cudnn on a GPU) vs the einsum path.
  generate  greedy decode tok/s and time-to-first-token (`sampling.generate` vs
            transformers `generate` with its KV cache), exactly `gen_new` tokens.
  sft       one AdamW train step on a masked LM loss (`make_train_step` vs a
            transformers + torch step with fused AdamW, as HF's Trainer uses).
  ppo       seconds per PPO iteration split into rollout / scoring / update
            (cai_jax's `ppo.Iteration` vs TRL 1.9.2's `trl.experimental.ppo.PPOTrainer`).
  grpo      seconds per GRPO iteration by phase, the PPO mode's prompts and lengths with
            4 responses per prompt, the same reward model and beta on both sides
            (`ppo.Iteration` with `ppo.advantage = "grpo"` vs TRL's `GRPOTrainer`).
  lora      the sft mode's step with LoRA rank `lora_rank` (alpha 32) on every projection
            of the frozen model (cai_jax's adapters vs `peft.get_peft_model` on the torch
            model), at the sft mode's sizes.
  dpo       seconds per DPO train step on chosen + rejected in one forward with
            precomputed reference log-probs (`cai_jax.train.dpo`'s loss in a compiled
            train step vs TRL's `DPOTrainer` with `precompute_ref_log_probs=True`).

Two device modes (`suite.run(device=...)`, `--device`); each one's presets, sizes and
targets are in `targets.json`:
  cpu  fp32, preset `small`, references on the CPU, shared weights.
  gpu  bf16 compute (fp32 master weights for training, bf16 weights for decoding);
       `mistral_1b` for model/sft (B8 x T2048 and B4 x T4096), `mistral_7b` for
       decode at b1/b32/b128 (128-token prompts, 256 new), `small` for a PPO
       iteration of 64 prompts x (64 + 128) (GRPO: x 4 responses each; DPO: 32 pairs x
       (256 + 256)). The torch side runs on the same GPU
       (bf16 autocast over fp32 weights for training, bf16 weights for decoding,
       sdpa attention, fused AdamW), its models built directly on the device with
       the same shapes and their own random weights (drawing, saving and loading a
       7B checkpoint on the host would cost more than the benchmark). TRL has no
       GPU run here: PPO and GRPO report our phase split (PPO also compares the
       rollout with `sampling.generate` on the same model and batch), DPO our step.

Ceilings are measured in the same run (`hardware.measure_ceilings`): the matmul peak
(fp32 2048^3 on CPU, bf16 8192^3 on GPU) and memory bandwidth, printed beside the
datasheet figures (`targets.json`) where the device has some. Floors and MFU come from
them: on CPU from the measured peak and read bandwidth; on GPU MFU is against the
datasheet (the usual convention) and the decode roofline is (weight + KV-cache bytes) /
datasheet bandwidth.

Timing rules (`timing.py`): every measured call blocks until its result is ready; the
first call (compile / warm-up) is excluded; the median of `reps` calls is reported. All
cai_jax runs of a mode come before the torch runs, so the two thread pools do not spin
against each other. torch, transformers and trl are imported inside functions only.

This file imports nothing: `python -m launch.benchmark` runs it before `__main__.py`, which
must pin the CPU threads before jax, numpy or torch start.
"""

MODES = ("model", "attention", "generate", "sft", "ppo", "grpo", "dpo", "lora")
