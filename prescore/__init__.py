"""prescore: pre-scored sparse decode attention for vLLM.

The distribution maps the repository's top-level folders into one namespace:
``prescore.kernels`` (kernels/), ``prescore.backend`` (backend/), ``prescore.server`` (server/),
``prescore.loadtest`` (loadtest/).
"""

__version__ = "0.1.0"
