"""Generation for the Chameleon baseline: text and images are both sampled token by token.

The structure of ``transfusion.generation.Generator`` (batched rows in lock step, KV cache, per-prompt
seeds, CFG from an unconditional row per prompt) with images as codes: when BOI is sampled (or a prompt
ends with ``IMAGE``), exactly n image tokens are sampled with logits restricted to the codebook, each
committed like a text token; then EOI is committed and LM mode resumes. Text sampling never emits an
image code. Classifier-free guidance mixes the logits of the prompt's row and of its caption-dropped
row (``BOS BOI <codes so far>``, as trained with caption dropout): l = l_u + s (l_c - l_u); both rows
receive the sampled code. Input images are encoded to codes by the frozen VQ-VAE and enter as tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfusion.generation import Generator, SamplingOptions, sample_tokens
from transfusion.models.attention import dense_mask
from transfusion.models.kv_cache import set_commit


@dataclass
class ChameleonSamplingOptions(SamplingOptions):
    """``SamplingOptions`` (its diffusion fields unused) plus the sampling of image codes."""

    image_temperature: float = 1.0  # 0: greedy codes
    image_top_p: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.image_temperature < 0:
            raise ValueError(f"image_temperature must be >= 0, got {self.image_temperature}")
        if not 0.0 < self.image_top_p <= 1.0:
            raise ValueError(f"image_top_p must be in (0, 1], got {self.image_top_p}")


class ChameleonGenerator(Generator):
    """Generates from a ``ChameleonModule``; prompts and outputs as for ``Generator``."""

    options_class = ChameleonSamplingOptions

    def __init__(self, module, options: ChameleonSamplingOptions | None = None, seed: int = 0):
        super().__init__(module, options or ChameleonSamplingOptions(), seed)
        self.text_vocab = module.config.text_vocab_size
        codes = torch.arange(self.text_vocab, module.config.vocab_size, device=self.device)
        self.banned = torch.cat([self.banned, codes])  # LM mode samples text only

    def _encode_prompt(self, prompt, index: int):
        """Token ids with each input image's codes in place of its n positions (no latents)."""
        ids, codes, force = super()._encode_prompt(prompt, index)
        ids = torch.tensor(ids)
        if codes:
            ids[ids == -1] = torch.cat(codes).cpu() + self.text_vocab
        return ids.tolist(), [], force

    def _run(self, block: dict, images: dict, commit: bool):
        """Hidden states (R, Lq, D) of the new positions; every position is a token, always committed."""
        st, Lq = self.stream, block["tokens"].shape[1]
        if self.options.use_cache:
            tokens, doc, pos = block["tokens"], block["doc"], block["pos"]
            full_doc = torch.cat([st.doc, doc], 1)
            mask = dense_mask(full_doc, torch.full_like(full_doc, -1), bidirectional=False, num_queries=Lq)
            set_commit(self.caches, commit)
            caches = self.caches
        else:
            tokens, doc, pos = (torch.cat([getattr(st, k), block[k]], 1) for k in ("tokens", "doc", "pos"))
            mask, caches = dense_mask(doc, torch.full_like(doc, -1), bidirectional=False), None
        hidden = self.model(tokens, doc, mask=mask, pos=pos, caches=caches)
        if commit:
            st.append(block)
        return hidden[:, -Lq:], {}

    def _denoise(self, image_rows: list[int]) -> dict[int, torch.Tensor]:
        """Sample n codes for each prompt row in ``image_rows`` (BOI committed), then commit EOI."""
        guided = self.R > self.B
        uncond = [r + self.B for r in image_rows] if guided else []
        rows = image_rows + uncond
        active = torch.zeros(self.R, dtype=torch.bool)
        active[rows] = True
        o, V = self.options, self.text_vocab
        generators = [self.generators[r] for r in image_rows]
        codes = []
        for _ in range(self.n):
            logits = self.logits[image_rows, V:].float()  # (I, K): image codes only
            if guided:
                logits_u = self.logits[uncond, V:].float()
                logits = logits_u + o.cfg_scale * (logits - logits_u)
            code = sample_tokens(logits, o.image_temperature, o.image_top_p, generators)  # (I,)
            codes.append(code)
            step = [[self.tok.pad_id]] * self.R
            for k, r in enumerate(image_rows):
                step[r] = [V + int(code[k])]
                if guided:
                    step[r + self.B] = step[r]
            hidden, _ = self._run(self._block(step, active), {}, commit=True)
            self.logits[rows] = self.model.lm_head(hidden[rows, -1]).to(self.logits.dtype)
        hidden, _ = self._run(self._block([[self.tok.eoi_id]] * self.R, active), {}, commit=True)
        self.logits[image_rows] = self.model.lm_head(hidden[image_rows, -1]).to(self.logits.dtype)
        if guided:
            self._retire_unconditional(uncond)
        codes = torch.stack(codes, 1)  # (I, n)
        return {r: codes[k] for k, r in enumerate(image_rows)}

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.module.decode_codes(codes)
