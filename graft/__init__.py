"""graft: multi-token-prediction heads grafted onto a frozen LLM, decoded by self-speculation."""
from .config import GRAFT_VERSION as __version__
from .config import GraftError


def add_heads(*args, **kwargs):
    from .model import add_heads as _add_heads

    return _add_heads(*args, **kwargs)


def load(*args, **kwargs):
    from .model import load as _load

    return _load(*args, **kwargs)


add_heads.__doc__ = "Graft fresh heads onto a frozen backbone; see graft.model.add_heads."
load.__doc__ = "Load a graft folder or export; see graft.model.load."
__all__ = ["add_heads", "load", "GraftError", "__version__"]
