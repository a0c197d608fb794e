"""arctl's shared library: schemes, quantization math, plans, checkpoints, models, data, evaluation.

Importing ``arctl`` loads no torch; the submodules that need it import it themselves.
"""

__version__ = "0.1.0"
