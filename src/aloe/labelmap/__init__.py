"""Label Mapping: huge N-class classification as several small multi-class heads (Zhang et al. 2018).

Modules follow the method: :mod:`~aloe.labelmap.maps` (number-theoretic and information-theoretic label maps, MACH
hashes, the map report, the CRT), :mod:`~aloe.labelmap.model` (shared trunk + heads, independent heads, softmax),
:mod:`~aloe.labelmap.decode` (exact chunked top-k decoders, CRT hard decoding, ECOC decoding),
:mod:`~aloe.labelmap.codes` (ECOC codes), :mod:`~aloe.labelmap.tasks` (words, synthetic, chars) and
:mod:`~aloe.labelmap.harness` (budgets, training and evaluation of every method alike).
"""

from aloe.labelmap.maps import (
    LabelMap,
    crt,
    information_theoretic_map,
    mach_map,
    map_report,
    number_theoretic_map,
)

__all__ = ["LabelMap", "crt", "information_theoretic_map", "mach_map", "map_report", "number_theoretic_map"]
