"""draftwise: faster generation with identical output.

Draft future tokens cheaply, verify them all in one forward pass over a token tree, keep the
longest run the model agrees with. Greedy output equals plain greedy decoding; sampled output
follows exactly the model's distribution.

    >>> import draftwise
    >>> generator = draftwise.Generator("default", method="pld")
    >>> print(generator.generate("Why is the sky blue?", max_new_tokens=64).text)
"""

from draftwise.api import Completion, Generator
from draftwise.backends.base import PromptTooLongError
from draftwise.drafters.base import UnknownMethodError, available_methods, create_drafter
from draftwise.engine import Engine, GenerationConfig
from draftwise.models import LoadedModel, ModelError, ModelNotFoundError, load_model
from draftwise.sampling import SamplingConfig
from draftwise.tree import DraftTree

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "DraftTree",
    "Engine",
    "GenerationConfig",
    "Generator",
    "LoadedModel",
    "ModelError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "SamplingConfig",
    "UnknownMethodError",
    "available_methods",
    "create_drafter",
    "load_model",
    "__version__",
]
