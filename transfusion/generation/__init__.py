"""Mixed-modal generation: one loop for both models (``base``), images by diffusion (``transfusion``) or by
sampling VQ codes (``chameleon``).

A trained LightningModule gives its generator with its own settings: ``module.generator(**overrides)``;
or build one from the networks: ``TransfusionGenerator(model, autoencoder, tokenizer, SamplingOptions(...))``.
"""

from transfusion.generation.base import MixedModalGenerator
from transfusion.generation.chameleon import ChameleonGenerator
from transfusion.generation.options import ChameleonSamplingOptions, SamplingOptions, sample_tokens
from transfusion.generation.transfusion import TransfusionGenerator
from transfusion.images import IMAGE

__all__ = ["IMAGE", "ChameleonGenerator", "ChameleonSamplingOptions", "MixedModalGenerator", "SamplingOptions",
           "TransfusionGenerator", "sample_tokens"]
