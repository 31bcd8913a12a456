"""aloe: privacy-preserving machine learning.

Subpackages, one per system:

- :mod:`aloe.obfuscation` -- AloePri, private LLM inference by covariant obfuscation;
- :mod:`aloe.mpc` -- Morse-STF secure training and the G-module protocols;
- :mod:`aloe.labelmap` -- huge N-class classification with small multi-class heads;
- :mod:`aloe.recsys` -- session recommendation with a matrix (quadratic-form) session embedding.

:mod:`aloe.assets` locates the offline real models and corpora all of them use.
"""

__version__ = "0.1.0"


class AloeError(Exception):
    """An error meant for the user: the CLI prints it as one line and exits non-zero."""
