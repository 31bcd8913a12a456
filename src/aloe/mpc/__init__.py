"""Morse-STF and the G-module protocols: secure computation with two computing parties (L, R) and a dealer.

- :mod:`aloe.mpc.ring` -- Z_2^64, fixed point, truncation, overflow checks;
- :mod:`aloe.mpc.dealer` -- PRF seeds (AES-CTR) and correlated randomness;
- :mod:`aloe.mpc.comm` -- framed, validated, counted channels; :mod:`aloe.mpc.party` -- parties and launchers;
- :mod:`aloe.mpc.triples` -- bilinear-map Beaver triples and the triangle triple;
- :mod:`aloe.mpc.gmodule` -- G-module action / cross action / recover, compare, DReLU, select, ReLU;
- :mod:`aloe.mpc.prefix` -- DReLU by a parallel-prefix carry over AND gates on bit planes;
- :mod:`aloe.mpc.functions` -- Fourier sigmoid, ODE softmax, max-pool;
- :mod:`aloe.mpc.tensor` -- the shared tensor.
"""
