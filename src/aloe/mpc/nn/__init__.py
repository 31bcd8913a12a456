"""Secure training on the MPC engine (Morse-STF's ``ml`` part): layers with forward and backward on shared tensors
(:mod:`~aloe.mpc.nn.layers`), losses (:mod:`~aloe.mpc.nn.losses`), momentum SGD with the learning rate folded into
the fixed-point truncation (:mod:`~aloe.mpc.nn.optim`), the models (:mod:`~aloe.mpc.nn.models`: logistic
regression with vertically split features, Networks A-D), per-party data (:mod:`~aloe.mpc.nn.data`), network
profiles (:mod:`~aloe.mpc.nn.wan`) and the training run (:mod:`~aloe.mpc.nn.train`, ``aloe mpc train``).
"""
