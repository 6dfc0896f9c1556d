"""Multi-process tests on one machine: N `jax.distributed` processes on 127.0.0.1.

Test side: `run_workers(script, args)` starts one copy of a worker script per
process (2 CPU devices each), waits for all of them and returns their stdouts.
Worker side: `add_cluster_args(parser)` then `join(args)` joins the cluster
with gloo CPU collectives.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_DEVICES = 2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(script: str, args: list[str], *, num_processes: int = 2, timeout: float = 400,
                env: dict | None = None) -> list[str]:
  """Runs `script --process_id=i --num_processes=N --port=P *args` for every i; asserts
  each exits 0 and returns their stdouts in process order."""
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
         "JAX_PLATFORMS": "cpu", **(env or {})}
  # Output to files, not pipes: a process blocked on a full pipe would stall its peers too.
  logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
          for _ in range(num_processes)]
  procs = [subprocess.Popen([sys.executable, script, f"--process_id={i}",
                             f"--num_processes={num_processes}", f"--port={port}"] + list(args),
                            env=env, cwd=REPO, stdout=out, stderr=err)
           for i, (out, err) in enumerate(logs)]
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:   # on a timeout, don't leave the others waiting on their peer
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for p, (out, err) in zip(procs, logs):
    out.seek(0)
    err.seek(0)
    outputs.append((p.returncode, out.read(), err.read()))
    out.close()
    err.close()
  for i, (rc, out, err) in enumerate(outputs):
    assert rc == 0, f"process {i} exited {rc}:\n{out}\n{err[-6000:]}"
  return [out for _, out, _ in outputs]


def add_cluster_args(parser) -> None:
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)


def join(args):
  """Joins the cluster `run_workers` started; returns the `jax` module."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=60)
  return jax
