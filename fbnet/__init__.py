"""FB-Net: dual-branch foreground-background fusion network for image-text retrieval.

Importing ``fbnet`` does not import torch, so the torch-free pieces (``fbnet.windows``,
``fbnet.vocab``, ``fbnet.preprocess``, ``fbnet.runtime``) stay usable on serving hosts.
"""

__version__ = "0.1.0"

#: Version of the checkpoint and bundle formats this release writes and reads.
FORMAT_VERSION = 1
