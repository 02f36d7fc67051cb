"""fp4train: train LLaMA-style models with FP4 (E2M1) GEMMs, exact and fast on Hopper.

Typical use::

    import fp4train
    model = fp4train.convert(model, fp4train.Recipe.preset("fp4-paper"))
"""

from fp4train.recipe import DGEConfig, OCCConfig, OperandSpec, Recipe  # noqa: I001
from fp4train.linear import FP4Linear
from fp4train.convert import convert

__version__ = "0.1.0"
__all__ = ["Recipe", "OperandSpec", "DGEConfig", "OCCConfig", "FP4Linear", "convert"]
