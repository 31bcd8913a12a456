"""Matrix embedding for session-based recommendation (Zhang et al. 2019, arXiv 1908.10180).

A session's click sequence goes through a GRU; the vector baseline turns the last state into a vector w and scores an
item by w^T e, the matrix-embedding model turns it into a symmetric matrix A and scores e^T A e. Modules:

- :mod:`aloe.recsys.data` -- click logs, the standard session protocol, prefix examples, the processed-data cache;
- :mod:`aloe.recsys.symmetric` -- the n(n+1)/2 <-> symmetric-matrix map and the pairwise-product feature map phi;
- :mod:`aloe.recsys.models` -- popularity, vector (GRU4Rec-style), matrix-embedding and ComiRec-SA multi-interest
  models, the trained ones at equal budget on a shared GRU trunk;
- :mod:`aloe.recsys.train` -- training and full-ranking evaluation;
- :mod:`aloe.recsys.metrics` -- Recall@k and MRR@k;
- :mod:`aloe.recsys.retrieval` -- exact top-k, a faiss MIPS index over phi(e) (or per interest), the eigenvector route;
- :mod:`aloe.recsys.interests` -- positive eigenvectors of A as interests and the items each retrieves.
"""
