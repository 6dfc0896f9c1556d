"""HTTP serving (NeMo's `PUT /generate` and an OpenAI-compatible `/v1`) and clients for both.

- `server.py`: `create_app`, the thin FastAPI app (routes, API key, health, errors);
- `worker.py`: `BatchingWorker`, the one thread that runs the model, batching requests;
- `nemo.py`, `openai_api.py`: each protocol's pure request parser and response renderer;
- `protocol.py`: what both share (`RequestError`, typed field readers, limits);
- `client.py`: `NemoClient` and `OpenAIClient`.

The clients need only `requests`; import the server (FastAPI) explicitly:
`from cai_jax.serve.server import create_app`.
"""

from cai_jax.serve.client import NemoClient, OpenAIClient, RemoteError

__all__ = ["NemoClient", "OpenAIClient", "RemoteError"]
