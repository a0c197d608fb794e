"""arctl_cli: the ``arctl`` command, the composition root that imports every engine.

arctl draws its own progress bars; third-party tqdm bars (transformers' GGUF loader) would interleave
with them, and tqdm reads ``TQDM_DISABLE`` when it is first imported, so it is set here, first.
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")
