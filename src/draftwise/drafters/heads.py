"""Draft heads on the target's own hidden state: ``medusa`` and ``hydra``.

Medusa (Cai et al. 2024) puts K small heads on the target's last hidden state h_t: head k
guesses the token k + 1 places ahead (the target's own head gives the next one, here the step's
new root). Hydra (Ankner et al. 2024) makes the heads sequential: a head also sees the token
drafted before it, so its guess follows the branch it extends. Ours:

    z_k = h + SiLU(W_k h + U_k e(prev) + b_k)      (medusa: no U_k e(prev) term)
    logits_k = z_k @ E_V.T

``e(prev)`` is the target's input embedding of the previous token on the branch (for head 1,
the root), and ``E_V`` is the target's own LM-head rows for a reduced *draft vocabulary* V: the
tokens the target emits most often on the training corpus (FR-Spec / EAGLE-3's draft vocabulary).
On a CPU the LM head is a fifth of SmolLM2's step, so scoring 4096 tokens instead of 49152 is
what keeps a head cheap; and because E_V is read from the target at load time, a head file holds
only ``W_k``, ``U_k``, ``b_k`` and V (a few MB). The hidden state comes from the backend at
commit (``StepResult.hidden``: the row that predicted the new root), at no extra forward pass.

The tree: head 1's ``top_k`` tokens below the root; below each of the ``beam`` likeliest nodes
of a level, the next head's ``branch`` best tokens (hydra: scored given that node's token;
medusa: the same for every parent) — then the engine's sizer keeps what pays, by the running
acceptance of each (depth, rank). Drafts are deterministic top-k choices, so under sampling the
verifier's rule for drafts without probabilities applies (draw from the target, descend if a
child carries the draw): lossless.

Heads are trained by ``draftwise train-heads`` (:mod:`draftwise.heads_train`); heads for the
default model ship in the package (``drafters/heads/``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from draftwise.drafters.base import StepResult, register
from draftwise.sampling import GREEDY, SamplingConfig
from draftwise.tree import DraftTree

__all__ = ["DraftHeads", "HeadsConfig", "HeadsDrafter", "HeadsMismatchError", "packaged_heads",
           "target_fingerprint"]

KINDS = ("medusa", "hydra")
_PACKAGED = Path(__file__).with_name("heads")


class HeadsMismatchError(ValueError):
    """A head file made for another model (vocabulary, hidden size or weights)."""


class DraftHeads(torch.nn.Module):
    """K heads over a hidden size H and a draft vocabulary ``vocab`` (token ids of the target).

    ``lm_rows``/``embed``: the target's LM-head rows for ``vocab`` ``[V, H]`` and a callable
    giving input embeddings of token ids ``[n] -> [n, H]`` (both from the target, not saved)."""

    vocab: torch.Tensor

    def __init__(self, kind: str, heads: int, hidden: int, vocab: torch.Tensor,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.hidden = kind, hidden
        self.meta = dict(meta or {})
        self.register_buffer("vocab", vocab.to(torch.long))
        self.w = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(heads))
        self.u = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False)
                                     for _ in range(heads if kind == "hydra" else 0))
        for linear in [*self.w, *self.u]:  # start as the identity map: z = h (+ 0)
            torch.nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                torch.nn.init.zeros_(linear.bias)

    @property
    def heads(self) -> int:
        return len(self.w)

    def states(self, k: int, h: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """``z_k`` for hidden states ``h: [n, H]`` and previous-token embeddings ``[n, H]``."""
        pre = self.w[k](h)
        if self.kind == "hydra":
            assert prev is not None
            pre = pre + self.u[k](prev)
        return h + F.silu(pre)

    def logits(self, k: int, h: torch.Tensor, prev: torch.Tensor | None,
               lm_rows: torch.Tensor) -> torch.Tensor:
        """Head ``k``'s logits over the draft vocabulary: ``[n, V]``."""
        return self.states(k, h, prev) @ lm_rows.T

    # files -----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().to(torch.float16).contiguous()
                   for name, t in self.state_dict().items() if name != "vocab"}
        tensors["vocab"] = self.vocab.to(torch.int32).contiguous()
        meta = {**self.meta, "kind": self.kind, "heads": str(self.heads),
                "hidden": str(self.hidden)}
        save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str | Path) -> DraftHeads:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no head file at {str(path)!r}")
        with safe_open(str(path), framework="pt") as file:
            meta = dict(file.metadata() or {})
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        try:
            heads = cls(meta["kind"], int(meta["heads"]), int(meta["hidden"]), tensors["vocab"],
                        meta)
        except KeyError as error:
            raise HeadsMismatchError(f"{path} is not a draftwise head file ({error})") from None
        state = {name: t.float() for name, t in tensors.items() if name != "vocab"}
        state["vocab"] = tensors["vocab"].long()
        heads.load_state_dict(state)
        return heads.eval()


def target_fingerprint(lm_rows: torch.Tensor) -> str:
    """A short hash of the target's LM-head rows for the draft vocabulary (values rounded to
    float16): a head file records it, and refuses a target whose rows differ."""
    data = lm_rows.detach().to(torch.float16).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def target_rows(backend: Any, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The target's LM-head rows ``[len(ids), H]`` and its input-embedding lookup, from a
    fast or quant backend."""
    from draftwise.backends.decoder import DecoderBackend

    if not (isinstance(backend, DecoderBackend) and backend.capabilities.hidden_states):
        raise ValueError("draft heads need the fast or quant backend (they read the target's "
                         "hidden state, LM head and embeddings)")

    def lookup(tokens: torch.Tensor) -> torch.Tensor:
        return backend.embed_rows(tokens).float()

    return backend.lm_head_rows(ids).contiguous(), lookup


class _KernelHeads:
    """The heads' products on the quant backend's kernels: ``W_k``, ``U_k`` and the draft
    vocabulary's LM-head rows rounded to Q8_0 blocks, run as 8-bit dot products like the
    target's own: float32 ``torch`` products spend most of a proposal reading the float32 rows
    once per level, and Q8_0 rows are a quarter of the bytes (figures: docs/benchmarks.md).
    Draft scores only:
    which tokens are drafted may change in a near-tie, never which are accepted."""

    def __init__(self, heads: DraftHeads, rows: torch.Tensor, ops: Any) -> None:
        from draftwise.backends.quant import QuantLinear

        def q8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantLinear:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize

            blocks = quantize(weight.detach().float().numpy(), GGMLQuantizationType.Q8_0)
            return QuantLinear(torch.from_numpy(blocks), "Q8_0", weight.shape[1],
                               None if bias is None else bias.detach().float(), ops, "int8")

        def linears(modules: torch.nn.ModuleList) -> list[torch.nn.Linear]:
            return [m for m in modules if isinstance(m, torch.nn.Linear)]

        self.kind = heads.kind
        self.w = [q8(linear.weight, linear.bias) for linear in linears(heads.w)]
        self.u = [q8(linear.weight) for linear in linears(heads.u)]
        self.score = q8(rows)

    def logits(self, k: int, h: torch.Tensor, prev: torch.Tensor | None,
               lm_rows: torch.Tensor) -> torch.Tensor:
        pre = self.w[k](h)
        if self.kind == "hydra":
            assert prev is not None
            pre = pre + self.u[k](prev)
        return self.score(h + F.silu(pre))


def packaged_heads(model_name: str, kind: str) -> Path:
    """The head file shipped for ``model_name`` (the default model), if any."""
    return _PACKAGED / f"{model_name}.{kind}.safetensors"


@dataclass(frozen=True)
class HeadsConfig:
    """Attributes:
    heads: head file (.safetensors from draftwise train-heads); empty: the file shipped for
        the target (the default model has one).
    top_k: children of the root (head 1's best tokens).
    branch: children of each expanded node below the first level.
    beam: nodes expanded per level.
    depth: most levels (at most the file's number of heads).
    """

    heads: str = field(default="", metadata={"file": True})
    top_k: int = 4
    branch: int = 2
    beam: int = 2
    depth: int = 3


class HeadsDrafter:
    """Drafts a tree from the target's hidden state with trained heads (see module)."""

    kind = "medusa"
    # attach() reads the target's weights only (the hidden state arrives with each step), so
    # one backend's many sequences (the server's slots) can share the target it attached to

    def __init__(self, config: HeadsConfig) -> None:
        if min(config.top_k, config.branch, config.beam, config.depth) < 1:
            raise ValueError("top_k, branch, beam and depth must be >= 1")
        self.config = config
        self.heads: DraftHeads | None = None
        self._scorer: DraftHeads | _KernelHeads | None = None  # the heads' products
        self._rows = torch.empty(0)
        self._embed: Any = None
        self._hidden: torch.Tensor | None = None

    def attach(self, target: Any, target_backend: Any) -> None:
        path = Path(self.config.heads) if self.config.heads else packaged_heads(
            getattr(target, "name", ""), self.kind)
        if not path.is_file():
            raise FileNotFoundError(
                f"no {self.kind} heads for {getattr(target, 'name', 'this model')}: train them "
                f"with 'draftwise train-heads --kind {self.kind}' and pass "
                f"'{self.kind}:heads=FILE' (or --heads FILE)")
        heads = DraftHeads.load(path)
        if heads.kind != self.kind:
            raise HeadsMismatchError(f"{path} holds {heads.kind} heads, not {self.kind}")
        vocab_size = int(target_backend.vocab_size)
        if int(heads.meta.get("vocab_size", -1)) != vocab_size:
            raise HeadsMismatchError(
                f"{path} was trained for a vocabulary of {heads.meta.get('vocab_size')} tokens "
                f"({heads.meta.get('model', '?')}); this model has {vocab_size}")
        rows, embed = target_rows(target_backend, heads.vocab)
        if rows.shape[1] != heads.hidden:
            raise HeadsMismatchError(f"{path} has hidden size {heads.hidden}; this model "
                                     f"{rows.shape[1]}")
        if heads.meta.get("fingerprint") not in (None, target_fingerprint(rows)):
            raise HeadsMismatchError(
                f"{path} was trained for {heads.meta.get('model', 'another model')}: this "
                "model's LM head differs")
        self.heads, self._rows, self._embed = heads, rows, embed
        self._scorer = heads
        from draftwise.backends.quant import QuantBackend

        ops = target_backend.ops if isinstance(target_backend, QuantBackend) else None
        if ops is not None and rows.shape[1] % 32 == 0:  # quant backend with its kernels
            self._scorer = _KernelHeads(heads, rows, ops)

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingConfig = GREEDY) -> None:
        if self.heads is None:
            raise RuntimeError(f"{self.kind} needs attach() with the target first")
        self._hidden = None

    @torch.inference_mode()
    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        heads, scorer, h = self.heads, self._scorer, self._hidden
        if heads is None or scorer is None or h is None or max_depth <= 0:
            return DraftTree.empty()
        cfg = self.config
        depth = min(max_depth, cfg.depth, heads.heads)
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []  # log-probability of each node's path under the heads
        frontier = [(-1, int(context[-1]), 0.0)]  # (node, its token, its path score)
        for level in range(depth):
            width = cfg.top_k if level == 0 else cfg.branch
            rows = h.expand(len(frontier), -1)
            prev = None
            if heads.kind == "hydra":
                prev = self._embed(torch.tensor([t for _, t, _ in frontier]))
            elif len(frontier) > 1:  # medusa: one distribution for every parent
                rows = rows[:1]
            logp = torch.log_softmax(scorer.logits(level, rows, prev, self._rows), dim=-1)
            top = torch.topk(logp, min(width, logp.shape[-1]), dim=-1)
            values, ids = top.values.tolist(), heads.vocab[top.indices].tolist()
            new = []
            for i, (node, _, score) in enumerate(frontier):
                j = i if len(ids) > 1 else 0
                for value, token in zip(values[j], ids[j], strict=True):
                    tokens.append(int(token))
                    parents.append(node)
                    scores.append(score + value)
                    new.append(len(tokens) - 1)
            best = sorted(new, key=lambda n: -scores[n])[: cfg.beam]
            frontier = [(n, tokens[n], scores[n]) for n in best]
        return DraftTree(tuple(tokens), tuple(parents))

    def observe(self, step: StepResult) -> None:
        self._hidden = None if step.hidden is None else step.hidden.float().unsqueeze(0)


@register("medusa", HeadsConfig, "draft heads on the target's hidden state, each head alone "
          "(trained: draftwise train-heads)")
class MedusaDrafter(HeadsDrafter):
    kind = "medusa"


@register("hydra", HeadsConfig, "draft heads on the target's hidden state, each seeing the "
          "token before it (trained: draftwise train-heads)")
class HydraDrafter(HeadsDrafter):
    kind = "hydra"
