"""llama.cpp as a bench peer, on the same GGUF: its plain decoding and its own speculation.

Three peers, each checked for exactness against llama.cpp's own plain decoding:

- ``llamacpp``: plain greedy decoding;
- ``llamacpp-spec``: ``llama-server --spec-default`` (its ngram-mod speculation);
- ``llamacpp-draft``: a draft model (``--draft MODEL``, a GGUF with the same vocabulary) through
  ``--spec-type draft-simple``.

They drive a native ``llama-server`` over HTTP on 127.0.0.1, one server per peer, prompts sent as
token ids (``/completion`` with ``"prompt": [ids]``), so llama.cpp sees exactly the tokens
draftwise's chat template made; the time is the request's wall clock (prefill included, as
ours). The server is the one named by ``--llama-server PATH``, else ``$DRAFTWISE_LLAMA_SERVER``,
else ``llama-server`` on ``PATH``, else a build under ``~/.cache/draftwise/llamacpp/build/bin``.
docs/usage.md says how to build one (the fastest peer) or install the prebuilt ``xllamacpp``
wheel, which the bench drives in a child Python (``--llama-server xllamacpp``: plain only).
Without either, ``llamacpp`` falls back to the npm build (:mod:`draftwise.bench.llamacpp_npm`,
``llamacpp-lookup`` is its prompt lookup) and every record and the table say so.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from draftwise.bench.load import await_health, free_port
from draftwise.models import default_cache_dir

__all__ = ["Peer", "PeerUnavailable", "ServerPeer", "completion_request", "last_line",
           "find_llama_server", "parse_completion", "server_command", "start_peer"]

VARIANTS = ("plain", "spec", "draft")
START_TIMEOUT_S = 600.0  # a first load of a large GGUF from a cold disk
REQUEST_TIMEOUT_S = 3600.0


class PeerUnavailable(RuntimeError):
    """llama.cpp cannot run here; the message says why and how to get it."""


class Peer(Protocol):
    label: str

    def generate(self, tokens: list[int], max_new_tokens: int, eos: tuple[int, ...],
                 *, lookup: bool = False) -> dict[str, Any]: ...

    def close(self) -> None: ...


def find_llama_server(explicit: str | None = None) -> Path | None:
    """The ``llama-server`` binary to drive (see the module docstring), or None."""
    for candidate in (explicit, os.environ.get("DRAFTWISE_LLAMA_SERVER")):
        if candidate:
            path = Path(candidate).expanduser()
            found = shutil.which(str(path)) if not path.is_file() else str(path)
            if found is None:
                raise PeerUnavailable(f"no llama-server at {candidate}")
            return Path(found)
    on_path = shutil.which("llama-server")
    if on_path is not None:
        return Path(on_path)
    built = default_cache_dir() / "llamacpp" / "build" / "bin" / "llama-server"
    return built if built.is_file() else None


def server_command(binary: Path, gguf: Path, *, port: int, threads: int, context: int,
                   variant: str = "plain", draft: Path | None = None) -> list[str]:
    """The ``llama-server`` command line for one peer: one slot, CPU only, no web UI."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "-c", str(context), "-np", "1",
               "-ngl", "0", "--no-webui"]
    if variant == "spec":
        command.append("--spec-default")
    elif variant == "draft":
        if draft is None:
            raise PeerUnavailable("llamacpp-draft needs a draft GGUF: --draft MODEL.gguf")
        command += ["-md", str(draft), "--spec-type", "draft-simple", "-td", str(threads),
                    "-ngld", "0"]
    return command


def completion_request(tokens: list[int], max_new_tokens: int) -> dict[str, Any]:
    """A greedy ``/completion`` body on token ids, no prompt cache (each request prefills, as
    ours do), the generated ids returned."""
    return {"prompt": tokens, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
            "cache_prompt": False, "return_tokens": True, "stream": False}


def parse_completion(answer: dict[str, Any], eos: tuple[int, ...], seconds: float
                     ) -> dict[str, Any]:
    """Our record fields from a ``/completion`` answer: the generated ids up to (not including)
    an end-of-sequence id, the wall seconds, and the drafted/accepted counts of its
    speculation."""
    if "error" in answer:
        raise RuntimeError(f"llama.cpp answered an error: {answer['error']}")
    tokens = [int(t) for t in answer.get("tokens", [])]
    for i, token in enumerate(tokens):
        if token in eos:
            tokens = tokens[:i]
            break
    timings = answer.get("timings", {})
    drafted = int(timings.get("draft_n", 0))
    accepted = int(timings.get("draft_n_accepted", 0))
    return {"tokens": tokens, "seconds": seconds, "validated": accepted,
            "refuted": drafted - accepted,
            "prefill_ms": float(timings.get("prompt_ms", 0.0)),
            "decode_tok_s": float(timings.get("predicted_per_second", 0.0))}


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"llama.cpp answered HTTP {error.code}: "
                           f"{error.read().decode(errors='replace')[:300]}") from error
    return answer


@dataclass
class ServerPeer:
    """One native ``llama-server`` process and its address."""

    process: subprocess.Popen[bytes]
    url: str
    label: str
    log: IO[str]

    def generate(self, tokens: list[int], max_new_tokens: int, eos: tuple[int, ...],
                 *, lookup: bool = False) -> dict[str, Any]:
        if self.process.poll() is not None:
            raise RuntimeError(f"llama-server exited (code {self.process.returncode})")
        start = time.perf_counter()
        answer = _post(self.url + "/completion", completion_request(tokens, max_new_tokens),
                       REQUEST_TIMEOUT_S)
        return parse_completion(answer, eos, time.perf_counter() - start)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _version(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return "version unknown"


def start_server(binary: Path, gguf: Path, *, variant: str = "plain", draft: Path | None = None,
                 threads: int | None = None, context: int = 4096) -> ServerPeer:
    """Start ``llama-server`` for one peer and wait until it answers ``/health``."""
    threads = threads or torch.get_num_threads()
    port = free_port()
    command = server_command(binary, gguf, port=port, threads=threads, context=context,
                             variant=variant, draft=draft)
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing can fill and block
    process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    label = f"llama.cpp native llama-server {_version(binary)} ({variant})"
    peer = ServerPeer(process, f"http://127.0.0.1:{port}", label, log)
    atexit.register(peer.close)  # a server outliving the bench would hold its memory and port
    why = await_health(process, port, START_TIMEOUT_S)
    if why is not None:
        exited = process.poll() is not None
        reason = last_line(log, process) if exited else f"it {why}"
        peer.close()
        raise PeerUnavailable(f"llama-server did not start: {reason}")
    return peer


def last_line(log: IO[str], process: subprocess.Popen[Any]) -> str:
    """The last non-empty line a process that ended wrote to ``log``, else its exit code."""
    log.seek(0)
    lines = [line for line in log.read().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {process.returncode}"


def start_xllamacpp(gguf: Path, *, threads: int | None = None, context: int = 4096,
                    python: str | None = None) -> ServerPeer:
    """llama.cpp's server through the ``xllamacpp`` wheel (its prebuilt CPU build: compatible
    rather than fast), run by ``xllamacpp_peer.py`` in ``python`` (``$DRAFTWISE_XLLAMACPP_PYTHON``,
    else this interpreter), which must import ``xllamacpp``; it serves the same HTTP API as
    ``llama-server``, so the requests are the native peer's."""
    python = python or os.environ.get("DRAFTWISE_XLLAMACPP_PYTHON") or sys.executable
    script = resources.files("draftwise.bench").joinpath("xllamacpp_peer.py")
    threads = threads or torch.get_num_threads()
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([python, str(script), str(gguf), str(threads), str(context)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    assert process.stdout is not None
    ready = process.stdout.readline()  # {"url": ..., "version": ...} once loaded
    if not ready:
        process.wait()
        reason = last_line(log, process)
        log.close()
        raise PeerUnavailable("xllamacpp did not start (pip install xllamacpp, or name a "
                              "Python that has it in $DRAFTWISE_XLLAMACPP_PYTHON): " + reason)
    info = json.loads(ready)
    peer = ServerPeer(process, info["url"].rstrip("/"),
                      f"llama.cpp via xllamacpp {info.get('version', '?')} (prebuilt wheel)", log)
    atexit.register(peer.close)
    return peer


def start_peer(gguf: str | Path, *, variant: str = "plain", draft: str | Path | None = None,
               server: str | None = None, threads: int | None = None,
               context: int = 4096) -> Peer:
    """The llama.cpp peer for ``variant`` on ``gguf``: a native ``llama-server`` (``server``:
    its path; ``"xllamacpp"``: the wheel; ``"npm"``: the npm build), else the npm fallback for
    plain decoding. Raises :class:`PeerUnavailable` with the reason when none can run."""
    path = Path(gguf)
    if path.suffix.lower() != ".gguf":
        raise PeerUnavailable(f"llama.cpp runs GGUF files and the model is {gguf}")
    if server == "xllamacpp":
        if variant != "plain":
            raise PeerUnavailable(f"the xllamacpp peer runs plain decoding only, not {variant}")
        return start_xllamacpp(path, threads=threads, context=context)
    binary = None if server == "npm" else find_llama_server(server)
    if binary is not None:
        draft_path = Path(draft) if draft is not None else None
        if variant == "draft" and (draft_path is None or draft_path.suffix.lower() != ".gguf"):
            raise PeerUnavailable("llamacpp-draft needs a GGUF draft model: --draft MODEL.gguf")
        return start_server(binary, path, variant=variant, draft=draft_path, threads=threads,
                            context=context)
    if variant != "plain":
        raise PeerUnavailable(f"no native llama-server found for llamacpp-{variant} (see "
                              "docs/usage.md: build one, or name it with --llama-server)")
    from draftwise.bench.llamacpp_npm import start_npm_peer

    return start_npm_peer(path, context=context, threads=threads)
