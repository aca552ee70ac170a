"""What evaluation and sweeps ask of a trained model, whichever it is (Transfusion or Chameleon).

``GenerativeModule`` is a LightningModule mixin; a module provides ``model``, ``tokenizer``, ``sampling``
(its ``SamplingOptions``), ``flop_counter`` and ``text_logits``, names its ``generator_class`` and the
``image_sampling_fields`` of its options that say how images are sampled, and gets:

* ``generate_images(captions, seeds)``: caption i -> one image, seeded ``seeds[i]``, the module's settings;
* ``generate_captions(images, seeds, max_new_tokens)``: image i -> text (no guidance);
* ``text_logits(tokens, doc_ids, at)``: next-token logits on text-only rows, for perplexity;
* ``training_flops()``: the FLOP counter's summary (6ND, tokens, exact count with attention);
* ``sampling_summary()``: the generation settings, for reports.

Legend: B rows, L length, N images, P selected positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from transfusion.generation import IMAGE, Generator


class GenerativeModule:
    generator_class = Generator
    image_sampling_fields: tuple[str, ...] = ()

    def generate_images(self, captions: list[str], seeds: list[int]) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] for N captions (each prompt ``caption`` + ``IMAGE``)."""
        options = replace(self.sampling, max_new_tokens=0)
        outputs = self.generator_class(self, options).generate([[c, IMAGE] for c in captions], seeds=seeds)
        return torch.stack([next(s for s in out if isinstance(s, torch.Tensor)) for out in outputs])

    def generate_captions(self, images, seeds: list[int], max_new_tokens: int = 32) -> list[str]:
        """Text for each image ((N, 3, H, W) in [-1, 1] or PIL RGB), decoded with the module's text settings."""
        options = replace(self.sampling, cfg_scale=1.0, max_new_tokens=max_new_tokens)
        outputs = self.generator_class(self, options).generate([[image] for image in images], seeds=seeds)
        return ["".join(s for s in out if isinstance(s, str)).strip() for out in outputs]

    def text_logits(self, tokens: torch.Tensor, doc_ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits (P, V) at the ``at`` (B, L) positions of text-only rows (B, L)."""
        raise NotImplementedError

    def training_flops(self) -> dict:
        """``{params, tokens, flops (6ND), attention_pairs, exact_flops}`` of the training so far."""
        return self.flop_counter.summary()

    def sampling_summary(self) -> dict:
        s = self.sampling
        return {**{name: getattr(s, name) for name in self.image_sampling_fields},
                "cfg_scale": s.cfg_scale,
                "caption_decoding": "greedy" if s.temperature == 0 else f"temperature {s.temperature}, top_p {s.top_p}"}
