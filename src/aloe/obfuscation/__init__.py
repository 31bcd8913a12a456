"""AloePri: private LLM inference by covariant obfuscation.

Modules follow the method's sections: :mod:`.keys` (Algorithm 1), :mod:`.embedding` (vocabulary permutation and
noise), :mod:`.norm` (RMSNorm folding and kappa), :mod:`.attention` (Algorithm 2), :mod:`.ffn` (SwiGLU),
:mod:`.model` (whole-checkpoint conversion), :mod:`.profiles`, :mod:`.secret`, :mod:`.fidelity`.
"""
