"""Run by :func:`draftwise.bench.llamacpp.start_xllamacpp` in a Python that has ``xllamacpp``:
``python xllamacpp_peer.py GGUF THREADS CONTEXT``. Starts llama.cpp's server on the GGUF, writes
``{"url": ..., "version": ...}`` once it listens, and keeps it up until stdin closes. Imports
nothing of draftwise, so any interpreter with the wheel can run it."""

import json
import sys

import xllamacpp as xlc


def main() -> None:
    gguf, threads, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    params = xlc.CommonParams()
    params.model.path = gguf
    params.n_ctx = context
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    server = xlc.Server(params)
    version = getattr(xlc, "__version__", "?")
    print(json.dumps({"url": server.listening_address, "version": version}), flush=True)
    sys.stdin.read()  # until the bench closes our stdin or ends us
    del server


if __name__ == "__main__":
    main()
