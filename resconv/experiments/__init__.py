"""``resconv experiment``: the classic experiments on why deep networks need BatchNorm and
residual connections, run on resconv's own layers and real data (see each module).

* ``grad-norms`` (:mod:`.grad_norms`): per-layer gradient norms at initialisation, plain
  vs residual, with and without BatchNorm.
* ``degradation`` (:mod:`.degradation`): training error of plain and residual nets at 20
  and 56 layers (He et al. 2016, figures 1 and 6).
* ``lesion`` (:mod:`.lesion`): delete one block at a time from a trained ResNet-18 and a
  trained plain 18-layer net (Veit et al. 2016).
"""
from __future__ import annotations

import importlib

import resconv._cmd as _cmd

EXPERIMENTS = ("grad_norms", "degradation", "lesion")


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="plain vs residual, with and without BatchNorm: gradients, "
                                          "degradation, lesions", description=__doc__.split("\n\n")[0],
                       formatter_class=_cmd.HelpFormatter)
    exps = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name in EXPERIMENTS:
        importlib.import_module(f"{__name__}.{name}").add_parser(exps)
