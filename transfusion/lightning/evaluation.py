"""The paper's evaluation as a Lightning callback: FID and CLIP score of caption->image generations,
CIDEr-D of image->caption generations, perplexity on held-out text; and, on the embedded shapes, prompt
following (``follow``: the attributes read back from the generated pictures and captions); on the embedded
scenes, GenEval's rules (``geneval``: ``transfusion.evaluation.geneval``).

Model-agnostic: it asks the LightningModule only for what ``GenerativeModule`` (``transfusion.lightning.generative``)
provides: ``generate_images``, ``generate_captions``, ``text_logits``, ``tokenizer``, ``generation_seed``,
``max_seq_len`` and ``report_fields``; so Transfusion and Chameleon are evaluated by the same code.

Runs at the end of ``validate``/``test`` (and every ``every_n_train_steps`` of ``fit`` if set) on every
process: each rank generates its share of the N samples (sample i on rank i % world, seeded
``generation_seed + i`` so the images do not depend on the split), torchmetrics adds the states across
ranks. Results are logged, written to ``<output_dir>/evaluation.json|.md`` (``transfusion.evaluation.report``), and
image grids / caption samples go to the Trainer's logger (TensorBoard images and text, or PNG + Markdown next to a
CSV log: ``log_pictures``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm

from transfusion.evaluation.cider import CIDErD
from transfusion.evaluation.perplexity import text_windows, update_perplexity
from transfusion.evaluation.report import evaluation_report, markdown_table, write_report  # noqa: F401 (its old home)
from transfusion.lightning.ema import ema_weights
from transfusion.images import IMAGE, image_grid

METRICS = ("fid", "clip", "cider", "ppl", "follow", "edit", "geneval")
DEFAULT_METRICS = ("fid", "clip", "cider", "ppl")  # follow reads the embedded shapes only: opt in


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Evaluation(Callback):
    def __init__(self, num_samples: int = 1000, batch_size: int = 16, metrics: list[str] = list(DEFAULT_METRICS),
                 fid_weights: str | None = None, clip_model: str | None = None, max_text_windows: int | None = None,
                 every_n_train_steps: int | None = None, on_validation: bool = False, on_test: bool = True,
                 output_dir: str | None = None, log_samples: int = 16, max_caption_tokens: int = 32,
                 at_train_end: bool = True, fid_features: int = 2048, sampling: dict | None = None):
        """
        Args:
            num_samples: N held-out examples: N captions -> images (FID, CLIP), N images -> captions (CIDEr).
            metrics: any of fid, clip, cider, ppl (default: these four), follow (the embedded shapes only: ``follow@shapes`` is the share of
                caption -> image pictures with all four attributes right, ``follow@shapes/<attribute>``,
                ``/one_object``, ``/blank`` and ``/one_image`` (the prompt's output was exactly one image: one text
                token is sampled after it) its parts; ``captions@shapes`` the same for image -> caption text),
                edit (an editing data module's held-out edits, ``EditDataModule``: ``edit@shapes`` is the share of
                edits with the asked change, the rest kept, one object and exactly one image out;
                ``edit@shapes/asked``, ``/kept``, ``/one_object``, ``/one_image`` its parts; a before / instruction /
                after grid goes to the logger), geneval (the embedded scenes, ``images: scenes``: ``geneval@scenes`` is
                the mean over GenEval's six tasks of the share of caption -> image pictures right by GenEval's rules,
                ``geneval@scenes/<task>`` each task's share).
            fid_weights: torch-fidelity InceptionV3 weights (default: the file ``transfusion fid-weights`` writes).
            fid_features: 2048 (standard FID, key ``fid``) or 64/192/768 (earlier Inception layers, key ``fid@64``
                ...: cheap, for tests; not comparable with FID).
            clip_model: a local Hugging Face CLIP directory (required for ``clip``).
            max_text_windows: score only the first windows of the held-out text (None: all of it).
            output_dir: where ``evaluation.json`` / ``evaluation.md`` go (None: the logger's directory).
            log_samples: how many generated images / captions go to the logger.
            at_train_end: with ``every_n_train_steps``, also evaluate the final weights when the last step is
                not a multiple of it.
            sampling: image-sampling settings for these evaluations in place of the module's, e.g.
                ``{sampler: ddim, num_steps: 50}`` for cheap evaluations during training (reports name them;
                a flow model samples with ``euler`` only).
        """
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"Evaluation(metrics=...): unknown {sorted(unknown)}; choose from {list(METRICS)}")
        if fid_features not in (64, 192, 768, 2048):
            raise ValueError(f"Evaluation(fid_features={fid_features}) must be 64, 192, 768 or 2048 (standard FID)")
        if num_samples < 1 and set(metrics) - {"ppl"}:
            raise ValueError(f"Evaluation(num_samples={num_samples}) must be at least 1")
        self.num_samples, self.batch_size, self.metrics = num_samples, batch_size, list(metrics)
        self.fid_weights, self.clip_model, self.max_text_windows = fid_weights, clip_model, max_text_windows
        self.every_n_train_steps, self.on_validation, self.on_test = every_n_train_steps, on_validation, on_test
        self.output_dir, self.log_samples, self.max_caption_tokens = output_dir, log_samples, max_caption_tokens
        self.at_train_end, self.fid_features, self.sampling = at_train_end, fid_features, dict(sampling or {})
        self._fid_key = "fid" if fid_features == 2048 else f"fid@{fid_features}"
        self.results: dict | None = None
        self.history: list[dict] = []  # every report of this run, in order (sweeps read it)
        self._last_step: int | None = None
        self._train_start: float | None = None  # wall clock at the start of fit, and time spent evaluating since
        self._eval_seconds = 0.0
        self._fid = self._clip = None  # built once: CLIPScore by _check_weights, FID at the first evaluation
        self._check_weights()

    def _check_weights(self) -> None:
        """Fail at start-up, naming the option, when a metric's weights are missing."""
        if "fid" in self.metrics:
            from transfusion.evaluation.fid import resolve_weights
            resolve_weights(self.fid_weights)
        if "clip" in self.metrics:
            if self.clip_model is None:
                raise ValueError("the clip metric needs `clip_model`: a local Hugging Face CLIP directory "
                                 "(train one with `transfusion fit --config lightning_configs/clip_embedded.yaml`), "
                                 "or drop clip from `metrics`")
            from transfusion.evaluation.clip import clip_name, clip_score_metric
            # loaded here, kept for the evaluations; raises with the path if it is not a CLIP directory
            self._clip, self._clip_name = clip_score_metric(self.clip_model), clip_name(self.clip_model)

    # ------------------------------------------------------------------ hooks
    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.on_test:
            self.evaluate(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, "val")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and trainer.global_step > 0 and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module, "eval")

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start, self._eval_seconds = time.perf_counter(), 0.0
        if set(self.metrics) - {"ppl"} and hasattr(pl_module, "generator"):  # settings the model cannot sample with
            self.options(pl_module)  # (ddim for a flow model) fail now, not at the first evaluation

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every_n_train_steps and self.at_train_end and trainer.global_step not in (0, self._last_step):
            self.evaluate(trainer, pl_module, "eval")

    # ------------------------------------------------------------------ evaluation
    def _metric_objects(self, device):
        from transfusion.evaluation.fid import inception_fid

        if "fid" in self.metrics and self._fid is None:
            # the real images are the same N held-out examples at every evaluation: their statistics are kept
            self._fid = inception_fid(self.fid_weights, reset_real_features=False, features=self.fid_features)
            self._fid_has_real = False
        for m in (self._fid, self._clip):
            if m is not None:
                m.reset()
                m.to(device)

    def options(self, pl_module):
        """The module's sampling options with this callback's ``sampling`` replaced (checked by the generator)."""
        try:
            options = replace(pl_module.sampling, **self.sampling)
        except TypeError as error:
            raise ValueError(f"Evaluation(sampling={self.sampling}): {error}; valid: "
                             f"{sorted(vars(pl_module.sampling))}") from None
        pl_module.generator(options)  # options the model cannot sample with raise here
        return options

    @torch.no_grad()
    def evaluate(self, trainer, pl_module, prefix: str) -> dict:
        """Generate, score, log and report with ``options(pl_module)``; the module's mode is restored afterwards."""
        started = time.perf_counter()
        training_seconds = self._training_seconds(prefix)  # before this evaluation's own time
        was_training = pl_module.training
        options = self.options(pl_module) if hasattr(pl_module, "sampling") else None
        pl_module.eval()
        try:
            with ema_weights(trainer, pl_module):  # EMA callbacks: the averaged weights (transfusion.lightning.ema)
                return self._evaluate(trainer, pl_module, prefix, training_seconds, options)
        finally:
            pl_module.train(was_training)
            self._eval_seconds += time.perf_counter() - started

    def _evaluate(self, trainer, pl_module, prefix: str, training_seconds: float | None, options) -> dict:
        rank, world = trainer.global_rank, trainer.world_size
        datamodule = trainer.datamodule
        if getattr(datamodule, "layout", None) is None:
            datamodule.setup("test")
        device = pl_module.device
        self._metric_objects(device)
        results: dict = {}
        samples: list[dict] = []
        if set(self.metrics) & {"fid", "clip", "cider", "follow", "geneval"}:
            examples = datamodule.evaluation_examples(self.num_samples)
            mine = list(range(rank, len(examples), world))
            samples = self._generate(pl_module, examples, mine, rank, options)
        if self._fid is not None:
            if samples:
                if not self._fid_has_real:
                    self._fid.update(to_uint8(torch.stack([s["real"] for s in samples])).to(device), real=True)
                self._fid.update(to_uint8(torch.stack([s["generated"] for s in samples])).to(device), real=False)
            self._fid_has_real = True
            results[self._fid_key] = float(self._fid.compute())
        if self._clip is not None:
            if samples:
                self._clip.update(to_uint8(torch.stack([s["generated"] for s in samples])).to(device),
                                  [s["caption"] for s in samples])
            results[f"clip_score@{self._clip_name}"] = float(self._clip.compute())
        if "cider" in self.metrics:
            cider = CIDErD()
            cider.update([s["generated_caption"] for s in samples], [s["references"] for s in samples],
                         index=[s["index"] for s in samples])
            results["cider_d"] = float(cider.compute())
        if "follow" in self.metrics:
            results.update(follow_metrics(_gather([(s["caption"], s["generated"], s["generated_caption"],
                                                    s["references"][0], s["single"]) for s in samples])))
        if "geneval" in self.metrics:
            results.update(geneval_metrics(_gather([(s["generated"], s["metadata"]) for s in samples])))
        if "edit" in self.metrics:
            edits = self._edit(pl_module, datamodule, rank, world, options)
            results.update(edit_metrics(_gather(edits)))
            self._log_edits(trainer, edits, prefix)
        if "ppl" in self.metrics:
            results["ppl"] = self._perplexity(pl_module, datamodule, rank, world, device)
        if prefix == "eval":  # during fit: straight to the logger, at this step only
            if trainer.logger is not None and trainer.is_global_zero:
                trainer.logger.log_metrics({f"eval/{k}": v for k, v in results.items()}, step=trainer.global_step)
        else:
            for key, value in results.items():  # already global: no sync
                pl_module.log(f"{prefix}/{key}", value)
        self._log_samples(trainer, samples, prefix)
        self.results = self._report(trainer, pl_module, results, training_seconds, options)
        self.history.append({"stage": prefix, **self.results})
        self._last_step = trainer.global_step if prefix == "eval" else self._last_step
        return results

    def _generate(self, pl_module, examples: list[dict], mine: list[int], rank: int, options) -> list[dict]:
        seed = getattr(pl_module, "generation_seed", 0)
        samples = []  # a module without sampling options (not a GenerativeModule) samples with its own settings
        image_options = {} if options is None else {"sampling": options}
        text_options = {} if options is None else {"sampling": replace(options, max_new_tokens=self.max_caption_tokens)}
        chunks = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        for chunk in tqdm(chunks, desc=f"evaluation samples (rank {rank})", disable=rank != 0, leave=False):
            seeds = [seed + i for i in chunk]
            if "follow" in self.metrics and hasattr(pl_module, "generator"):  # one text token after: does it end?
                outputs = pl_module.generator(options, max_new_tokens=1).generate(
                    [[examples[i]["caption"], IMAGE] for i in chunk], seeds=seeds)
                images, single = _first_images(outputs, examples[chunk[0]]["image"]), [_single(o) for o in outputs]
            else:
                images = pl_module.generate_images([examples[i]["caption"] for i in chunk], seeds, **image_options)
                single = [True] * len(chunk)
            captions = pl_module.generate_captions([examples[i]["image"] for i in chunk], seeds, **text_options)
            for i, image, caption, one in zip(chunk, images, captions, single):
                samples.append({"index": i, "caption": examples[i]["caption"], "references": examples[i]["references"],
                                "real": examples[i]["image"].cpu(), "generated": image.cpu(),
                                "generated_caption": caption, "single": one,
                                "metadata": examples[i].get("metadata")})
        return samples

    def _edit(self, pl_module, datamodule, rank: int, world: int, options) -> list[dict]:
        """This rank's share of the held-out edits, each edited with the module's settings (seeded by its index)."""
        if not hasattr(datamodule, "edit_examples"):
            raise ValueError(f"the edit metric needs an editing data module (EditDataModule), got {type(datamodule).__name__}")
        examples = datamodule.edit_examples(self.num_samples)
        # one text token after the edited image: EOS ends the output there; BOI or text is not one image
        seed, generator = getattr(pl_module, "generation_seed", 0), pl_module.generator(options, max_new_tokens=1)
        mine, edits = list(range(rank, len(examples), world)), []
        for start in tqdm(range(0, len(mine), self.batch_size), desc=f"edits (rank {rank})", disable=rank != 0,
                          leave=False):
            chunk = mine[start:start + self.batch_size]
            outputs = generator.generate([datamodule.edit_prompt(examples[i]["source"], examples[i]["instruction"])
                                          for i in chunk], seeds=[seed + i for i in chunk])
            for i, out, edited in zip(chunk, outputs, _first_images(outputs, examples[chunk[0]]["source"])):
                example = examples[i]
                edits.append({"index": i, "source": example["source"].cpu(), "instruction": example["instruction"],
                              "edited": edited.cpu(), "single": _single(out),
                              "source_attributes": example.get("source_attributes"), "edit": example.get("edit")})
        return edits

    def _log_edits(self, trainer, edits: list[dict], prefix: str) -> None:
        gathered = sorted(_gather(edits[: self.log_samples]), key=lambda e: e["index"])[: self.log_samples]
        if not trainer.is_global_zero or not gathered or trainer.logger is None:
            return
        grid = image_grid([tile for e in gathered for tile in ((e["source"], "before"), (e["edited"], e["instruction"]))])
        log_pictures(trainer, prefix, {"edits": grid})

    def _perplexity(self, pl_module, datamodule, rank: int, world: int, device) -> float:
        tok = pl_module.tokenizer
        seq_len = datamodule.hparams.get("seq_len") or pl_module.max_seq_len  # the training rows' length
        windows = text_windows(datamodule.heldout_text, seq_len, tok.bos_id, tok.pad_id)
        if self.max_text_windows is not None:
            windows = windows[: self.max_text_windows]
        metric = Perplexity().to(device)
        mine = windows[rank::world]
        for i in range(0, len(mine), self.batch_size):
            batch = mine[i:i + self.batch_size]
            update_perplexity(metric, pl_module.text_logits, torch.stack([w["tokens"] for w in batch]).to(device),
                              torch.stack([w["doc_ids"] for w in batch]).to(device), tok.pad_id)
        self._ppl_tokens = int(_all_sum(metric.count.clone()))
        return float(metric.compute())

    # ------------------------------------------------------------------ outputs
    def _log_samples(self, trainer, samples: list[dict], prefix: str) -> None:
        gathered = _gather(samples[: self.log_samples])
        if not trainer.is_global_zero or not gathered or trainer.logger is None:
            return
        gathered = sorted(gathered, key=lambda s: s["index"])[: self.log_samples]
        grid = image_grid([(s["generated"], s["caption"]) for s in gathered])
        captions = image_grid([(s["real"], s["generated_caption"]) for s in gathered])
        table = "| # | reference | generated caption |\n|---|---|---|\n" + "".join(
            f"| {s['index']} | {s['references'][0]} | {s['generated_caption']} |\n" for s in gathered)
        log_pictures(trainer, prefix, {"caption_to_image": grid, "image_to_caption": captions}, {"captions": table})

    def _training_seconds(self, prefix: str) -> float | None:
        """Wall time of this fit so far, without the time spent evaluating (None outside fit)."""
        if prefix != "eval" or self._train_start is None:
            return None
        return time.perf_counter() - self._train_start - self._eval_seconds

    def _report(self, trainer, pl_module, results: dict, training_seconds: float | None = None, options=None) -> dict:
        report = evaluation_report(
            results, pl_module.report_fields(options), num_samples=self.num_samples if set(self.metrics) - {"ppl"} else 0,
            ppl_tokens=getattr(self, "_ppl_tokens", None) if "ppl" in self.metrics else None,
            fid_weights=self.fid_weights if "fid" in self.metrics else None,
            clip_model=self.clip_model if "clip" in self.metrics else None,
            training_seconds=training_seconds, world_size=trainer.world_size)
        if trainer.is_global_zero:
            folder = self.output_dir or (trainer.logger.log_dir if trainer.logger else trainer.default_root_dir)
            rank_zero_info(f"evaluation: {results} -> {write_report(report, folder)}")
        return report


def log_pictures(trainer, prefix: str, pictures: dict, texts: dict | None = None) -> None:
    """Image grids (name -> PIL image) and Markdown texts (name -> str) to the Trainer's logger at this step:
    TensorBoard images and text, or (CSV and other loggers) ``NAME.png`` / ``NAME.md`` files beside the log, in
    ``evaluation/<prefix>_step<N>/``."""
    step, logger, texts = trainer.global_step, trainer.logger, texts or {}
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_image"):  # TensorBoard
        import numpy as np
        for name, grid in pictures.items():
            experiment.add_image(f"{prefix}/{name}", np.asarray(grid), step, dataformats="HWC")
        for name, text in texts.items():
            experiment.add_text(f"{prefix}/{name}", text, step)
        return
    folder = Path(logger.log_dir or trainer.default_root_dir) / "evaluation" / f"{prefix}_step{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, grid in pictures.items():
        grid.save(folder / f"{name}.png")
    for name, text in texts.items():
        (folder / f"{name}.md").write_text(text)


def _first_images(outputs: list[list], like: torch.Tensor) -> list[torch.Tensor]:
    """Each generated output's first image; a black picture (read as blank) where a prompt returned none."""
    return [next((s for s in out if isinstance(s, torch.Tensor)), torch.full_like(like, -1.0)) for out in outputs]


def _single(output: list) -> bool:
    """The output is exactly one image: the model ended its document after it (no second image, no text)."""
    return len(output) == 1 and isinstance(output[0], torch.Tensor)


def follow_metrics(samples: list[tuple]) -> dict[str, float]:
    """Prompt-following rates from (caption, generated image, generated caption, reference caption[, exactly one
    image out]) tuples."""
    from transfusion.evaluation.follow import ATTRIBUTES, FollowScore, caption_scores

    if not samples:
        raise ValueError("evaluation: follow needs at least one sample (num_samples > 0)")
    score = FollowScore()
    score.update(torch.stack([s[1] for s in samples]), [s[0] for s in samples],
                 [s[4] if len(s) > 4 else True for s in samples])
    rates = score.compute()
    captions = caption_scores([s[2] for s in samples], [s[3] for s in samples])
    return {"follow@shapes": rates["all"],
            **{f"follow@shapes/{k}": rates[k] for k in (*ATTRIBUTES, "one_object", "blank", "one_image")},
            "captions@shapes": captions["all"], **{f"captions@shapes/{k}": captions[k] for k in ATTRIBUTES}}


def geneval_metrics(samples: list[tuple]) -> dict[str, float]:
    """GenEval-style scores (``transfusion.evaluation.geneval``) from (generated image, GenEval record) pairs."""
    from transfusion.evaluation.geneval import GenEvalScore

    if not samples:
        raise ValueError("evaluation: geneval needs at least one sample (num_samples > 0)")
    if any(s[1] is None for s in samples):
        raise ValueError("evaluation: geneval needs prompts with GenEval metadata: train on the embedded scenes "
                         "(data option images: scenes)")
    score = GenEvalScore()
    score.update(torch.stack([s[0] for s in samples]), [s[1] for s in samples])
    return {"geneval@scenes" if k == "overall" else f"geneval@scenes/{k}": v for k, v in score.compute().items()}


def edit_metrics(edits: list[dict]) -> dict[str, float]:
    """Edit accuracy (``transfusion.evaluation.edit``) from the callback's edit records."""
    from transfusion.evaluation.edit import EditScore

    if not edits or edits[0]["edit"] is None:
        raise ValueError("evaluation: edit needs held-out edits with their attributes (the embedded ShapeEdits)")
    score = EditScore()
    score.update(torch.stack([e["edited"] for e in edits]), [e["source_attributes"] for e in edits],
                 [e["edit"] for e in edits], [e.get("single", True) for e in edits])
    return {"edit@shapes" if k == "all" else f"edit@shapes/{k}": v for k, v in score.compute().items()}


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def _gather(items: list) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]
    return items
