"""Model registry: a model name and flavor give `ModelArgs`; one Transformer serves every family."""

from titanlm.models.flavors import FLAVORS, ModelArgs, get_model_args
from titanlm.models.transformer import Transformer, count_params

__all__ = ["FLAVORS", "ModelArgs", "Transformer", "count_params", "get_model_args"]
