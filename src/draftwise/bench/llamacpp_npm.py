"""The fallback llama.cpp peer: the npm package ``node-llama-cpp`` (prebuilt CPU binaries,
nothing to compile). Its build runs at a fraction of a native llama.cpp's speed and lacks
llama.cpp's newer speculation, so the bench uses it only when no native ``llama-server`` is found
(see :mod:`draftwise.bench.llamacpp`) and labels it. Installed once with::

    npm install --prefix ~/.cache/draftwise/llamacpp node-llama-cpp --ignore-scripts

(or into any folder named by ``$DRAFTWISE_LLAMACPP``). A small Node script
(``llamacpp_peer.mjs``) loads the GGUF and answers one JSON line per request; prompts travel as
token ids, so llama.cpp sees exactly the tokens draftwise's chat template made. When Node, the
package or a GGUF model is missing, :func:`start_npm_peer` raises :class:`PeerUnavailable` with the
one-line reason the bench prints before skipping the peer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import IO, Any

import torch

from draftwise.bench.llamacpp import PeerUnavailable, last_line
from draftwise.models import default_cache_dir

__all__ = ["NpmPeer", "peer_folder", "start_npm_peer"]

_SCRIPT = "llamacpp_peer.mjs"
INSTALL = "npm install --prefix {folder} node-llama-cpp --ignore-scripts"


def peer_folder() -> Path:
    """Where node-llama-cpp is installed: ``$DRAFTWISE_LLAMACPP`` or the cache's ``llamacpp``."""
    env = os.environ.get("DRAFTWISE_LLAMACPP")
    return Path(env).expanduser() if env else default_cache_dir() / "llamacpp"


class NpmPeer:
    """One Node process holding the GGUF; :meth:`generate` runs one greedy request."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    label = "llama.cpp (npm node-llama-cpp build: a fallback, slower than a native build)"

    def generate(self, tokens: list[int], max_new_tokens: int, eos: tuple[int, ...],
                 *, lookup: bool = False) -> dict[str, Any]:
        stdin, stdout = _pipes(self.process)
        request = {"tokens": tokens, "max_new_tokens": max_new_tokens, "eos": list(eos),
                   "lookup": lookup}
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp peer exited (code {self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"llama.cpp peer failed: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _pipes(process: subprocess.Popen[str]) -> tuple[IO[str], IO[str]]:
    assert process.stdin is not None and process.stdout is not None
    return process.stdin, process.stdout


def start_npm_peer(gguf: str | Path, *, context: int = 4096, threads: int | None = None,
                   folder: Path | None = None) -> NpmPeer:
    """Start llama.cpp on ``gguf``; raises :class:`PeerUnavailable` with the reason if it
    cannot run here."""
    folder = folder or peer_folder()
    if not str(gguf).lower().endswith(".gguf"):
        raise PeerUnavailable(f"llama.cpp runs GGUF files and the model is {gguf}")
    node = shutil.which("node")
    if node is None:
        raise PeerUnavailable("node is not on PATH (llama.cpp runs through node-llama-cpp)")
    if not (folder / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        raise PeerUnavailable(
            f"node-llama-cpp is not installed in {folder}; install it with: "
            + INSTALL.format(folder=folder)
        )
    # Node resolves the package from the script's own folder, so the script runs from there.
    script = folder / _SCRIPT
    source = resources.files("draftwise.bench").joinpath(_SCRIPT).read_text(encoding="utf-8")
    if not script.is_file() or script.read_text(encoding="utf-8") != source:
        script.write_text(source, encoding="utf-8")
    threads = threads or torch.get_num_threads()
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing can fill and block
    process = subprocess.Popen(
        [node, str(script), str(gguf), str(threads), str(context)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
    )
    _, stdout = _pipes(process)
    if not stdout.readline():  # the script's {"ready": true} line
        process.wait()
        raise PeerUnavailable(f"llama.cpp did not start: {last_line(errors, process)}")
    return NpmPeer(process)
