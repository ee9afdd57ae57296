"""hetero: run LLMs whose weights do not fit in memory, across gpu, cpu and disk."""

__version__ = "0.1.0"


def load_offloaded(*args, **kwargs):
    """See hetero.api.load_offloaded."""
    from .api import load_offloaded as _load

    return _load(*args, **kwargs)


load_offloaded.__doc__ = "Load a model placed across gpu, cpu and disk; see hetero.api.load_offloaded."
