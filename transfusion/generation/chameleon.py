"""Chameleon's images: after BOI, n image codes are sampled token by token, then EOI (the baseline's inference).

Each code is sampled with logits restricted to the codebook and committed like a text token; text
sampling never emits a code. Classifier-free guidance mixes the logits of the prompt's row and of its
caption-dropped row (``BOS BOI <codes so far>``, as trained with caption dropout): l = l_u + s (l_c - l_u);
both rows receive the sampled code. Input images are encoded to codes by the frozen VQ-VAE and enter as
tokens.

Legend: R rows, Lq new positions, I rows generating an image, n codes per image, K codebook size.
"""

from __future__ import annotations

import torch

from transfusion.generation.base import IMAGE_POSITION, UNCONDITIONAL, MixedModalGenerator, Run
from transfusion.generation.options import ChameleonSamplingOptions, sample_tokens


class ChameleonGenerator(MixedModalGenerator):
    """Generates from a ``Chameleon`` model, a ``VQAutoencoder`` and a ``Tokenizer``."""

    options_class = ChameleonSamplingOptions

    def __init__(self, model, autoencoder, tokenizer, options: ChameleonSamplingOptions | None = None, seed: int = 0):
        super().__init__(model, autoencoder, tokenizer, options, seed)
        self.patches_per_image, self.bidirectional = model.cfg.patches_per_image, False  # causal over codes, as trained
        self.text_vocab = model.cfg.text_vocab_size
        codes = torch.arange(self.text_vocab, model.cfg.vocab_size, device=self.device)
        self.banned = torch.cat([self.banned, codes])  # LM mode samples text only

    def _image_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode_codes(pixels[None])[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_codes(codes)

    def _encode_prompt(self, prompt, index: int):
        """Token ids with each input image's codes in place of its n positions (nothing else to carry)."""
        ids, codes, force, forced = super()._encode_prompt(prompt, index)
        ids = torch.tensor(ids)
        if codes:
            ids[ids == IMAGE_POSITION] = torch.cat(codes).cpu() + self.text_vocab
        return ids.tolist(), [], force, forced

    def _run_model(self, inputs: dict, ids: list[int], images: dict, mask, caches):
        """Every position is a token: hidden states only."""
        return self.model(inputs["tokens"], inputs["doc_ids"], mask=mask, pos=inputs["pos"], caches=caches), None

    def _generate_images(self, run: Run, image_rows: list[int]) -> dict[int, torch.Tensor]:
        """Sample n codes for each prompt row in ``image_rows``, committing each, then commit EOI."""
        uncond = run.rows(image_rows, [UNCONDITIONAL]) if run.guided else []
        rows = image_rows + uncond
        active = torch.zeros(run.R, dtype=torch.bool)
        active[rows] = True
        o, V = self.options, self.text_vocab
        generators = [run.generators[r] for r in image_rows]
        codes = []
        for _ in range(self.patches_per_image):
            logits = run.logits[image_rows, V:].float()  # (I, K): image codes only
            if run.guided:
                logits_u = run.logits[uncond, V:].float()
                logits = logits_u + o.cfg_scale * (logits - logits_u)
            code = sample_tokens(logits, o.image_temperature, o.image_top_p, generators)  # (I,)
            codes.append(code)
            step = [[self.tok.pad_id]] * run.R
            for k, r in enumerate(image_rows):
                step[r] = [V + int(code[k])]
                if run.guided:
                    step[run.row(r, UNCONDITIONAL)] = step[r]
            hidden, _ = self._forward(run, self._block(run, step, active), {}, commit=True)
            run.logits[rows] = self.model.lm_head(hidden[rows, -1]).to(run.logits.dtype)
        hidden, _ = self._forward(run, self._block(run, [[self.tok.eoi_id]] * run.R, active), {}, commit=True)
        run.logits[image_rows] = self.model.lm_head(hidden[image_rows, -1]).to(run.logits.dtype)
        if run.guided:
            self._retire(run, uncond)
        codes = torch.stack(codes, 1)  # (I, n)
        return {r: codes[k] for k, r in enumerate(image_rows)}
