"""``transfusion sweep``: train Transfusion and Chameleon at several sizes and budgets, evaluating along the way.

Every training run is ``transfusion fit`` (LightningCLI, in this process) on a model's own YAML plus the
sweep's overrides, with the ``Evaluation`` callback appended (every ``eval_every_n_steps`` and at the last
step). The sweep first makes what the runs share, unless given: the tokenizer, the KL-VAE (Transfusion),
the VQ-VAE (Chameleon) and the CLIP for CLIP scores, each with its own ``transfusion fit``. A finished run
leaves ``runs/<run>/evaluations.json`` and is not trained again, so a stopped sweep resumes where it was.

Ablations (paper Tables 5-8) are extra runs of one model at one size and budget, one per setting, each
setting a set of overrides (``{model.init_args.bidirectional_images: false}``); a setting equal to a main
run reuses it. Variants of Transfusion (``variants``: e.g. modality experts) are trained at every size and budget
like the two main models, with Transfusion's autoencoder and learning rate, and join Table 3. Override values
may name a prepared path, ``"{text_model}"`` (a text model pretrained here and saved in the Hugging Face Llama
layout, for LMFusion-style runs). ``transfusion.sweep.report`` turns the evaluations into Table 3, plots, CSV
and JSON.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from transfusion.atomic import write_text

MODELS = ("transfusion", "chameleon")


@dataclass
class ModelRuns:
    """A model of the comparison: its training YAML and overrides for all its runs (dotted CLI keys)."""

    config: str
    overrides: dict = field(default_factory=dict)


@dataclass
class Prerequisite:
    """Something the runs need: an existing ``path``, or trained with ``transfusion fit --config config``."""

    path: str | None = None
    config: str | None = None
    overrides: dict = field(default_factory=dict)


@dataclass
class Ablation:
    """One switch run on and off (or any number of settings) for ``model`` at ``size`` and ``budget``."""

    name: str
    settings: dict  # setting name -> overrides
    model: str = "transfusion"
    size: str | None = None  # None: the first size
    budget: int | None = None  # None: the first budget


@dataclass
class LearningRateGrid:
    """Learning rates tried for both models at one size and budget; each model's main runs and ablations then
    train at the rate with the best mean rank over the final ``metrics`` (the same grid and rule for both
    models; ties go to the better first metric). Several metrics: one noisy metric does not decide alone."""

    values: list[float]
    metrics: list[str] = field(default_factory=lambda: ["fid"])  # metric keys, or prefixes: "clip_score"
    size: str | None = None  # None: the first size
    budget: int | None = None  # None: the first budget


@dataclass
class Run:
    name: str
    model: str
    size: str
    budget: int
    overrides: dict
    ablation: str | None = None
    setting: str | None = None
    seed: int | None = None  # None: the model YAML's own seeds

    def key(self) -> tuple:
        return self.model, self.size, self.budget, self.seed, json.dumps(self.overrides, sort_keys=True)


def cli_args(overrides: dict) -> list[str]:
    """``{"a.b": 1}`` -> ``["--a.b", "1"]``; non-strings as JSON (true, null, lists)."""
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


def _metric_key(metric: str, evaluation: dict) -> str:
    """The evaluation key ``metric`` names: itself, or the one key ``metric@<tag>`` (``clip_score``)."""
    if metric in evaluation:
        return metric
    keys = [k for k in evaluation if k.startswith(metric + "@") and "/" not in k]
    if len(keys) != 1:
        raise ValueError(f"sweep: lr_grid metric {metric!r} names {'no' if not keys else 'more than one'} evaluated "
                         f"metric of {sorted(k for k in evaluation if k not in ('step', 'params', 'tokens'))}")
    return keys[0]


def best_by_mean_rank(finals: dict[float, dict], metrics: list[str]) -> float:
    """The key of ``finals`` (learning rate -> final evaluation) with the best mean rank over ``metrics`` (rank 1:
    best; equal values share their mean rank; a non-finite value, a diverged run, ranks last); ties go to the
    better value of the first metric."""
    from transfusion.sweep.parity import metric_info

    rates, ranks, first = list(finals), dict.fromkeys(finals, 0.0), {}
    for i, metric in enumerate(metrics):
        score = {}
        for lr in rates:
            key = _metric_key(metric, finals[lr])
            value, higher = float(finals[lr][key]), metric_info(key)[1]
            score[lr] = (-value if higher else value) if math.isfinite(value) else math.inf  # lower is better
        for lr in rates:
            ranks[lr] += sum(score[o] < score[lr] for o in rates) + (sum(score[o] == score[lr] for o in rates) + 1) / 2
        first = first or score
    return min(rates, key=lambda lr: (ranks[lr], first[lr]))


class Sweep:
    def __init__(self, transfusion: ModelRuns, chameleon: ModelRuns, sizes: dict[str, dict], budgets: list[int],
                 eval_every_n_steps: int, output: str = "outputs/sweep", evaluation: dict | None = None,
                 tokenizer: Prerequisite | None = None, tokenizer_vocab_size: int = 2048,
                 autoencoder: Prerequisite | None = None, vqvae: Prerequisite | None = None,
                 clip: Prerequisite | None = None, ablations: list[Ablation] | None = None,
                 lr_grid: LearningRateGrid | None = None, reference_size: str | None = None,
                 parity_curve: str = "all_sizes", variants: dict[str, ModelRuns] | None = None,
                 text_model: Prerequisite | None = None, ema: dict | None = None, seeds: list[int] | None = None):
        """
        Args:
            transfusion, chameleon: each model's training YAML and overrides for all its runs.
            sizes: size name -> overrides for both models (e.g. ``{model.init_args.preset: cpu-small}``), small to large.
            budgets: training steps of a run (``trainer.max_steps``); every size is trained once per budget,
                each run with its own learning-rate schedule. Tokens and FLOPs are measured, not assumed.
            eval_every_n_steps: evaluation cadence within a run (also at its last step).
            evaluation: ``transfusion.lightning.evaluation.Evaluation`` arguments (num_samples, metrics, ...).
            tokenizer, autoencoder, vqvae, clip: existing paths, or YAMLs to train them with (under ``output``).
            ablations: switches to run on/off, printed as a table.
            lr_grid: learning rates to try first; every other run then uses each model's best (``model.init_args.lr``).
            reference_size: the size whose largest-budget runs Table 3 compares (default: the last size).
            parity_curve: Transfusion evaluations that make the parity curve: ``all_sizes`` (any size reaching
                Chameleon's value counts) or ``same_size`` (only the reference size).
            variants: more Transfusion models for Table 3 (name -> YAML and overrides), at Transfusion's learning rate.
            text_model: a text model to pretrain (``config``: a text-only Transfusion fit, saved in the Hugging Face
                Llama layout) or an existing Llama-layout folder (``path``); overrides name it ``"{text_model}"``.
            ema: ``transfusion.lightning.ema.EMA`` arguments (e.g. ``{decay: 0.999}``): every run keeps an EMA of its
                weights, and its evaluations use it (None: the raw weights, no EMA).
            seeds: train every main run, variant and ablation setting once per seed (``seed_everything`` and, where
                the model has one, its ``noise_seed``; runs named ``...-seed<s>``); the tables report mean +- standard
                deviation over seeds and the parity ratio per seed. The learning-rate grid runs at the first seed
                only. None: one run each, at the YAMLs' seeds.
        """
        _check_arguments(sizes, budgets, eval_every_n_steps, reference_size, seeds, parity_curve)
        self.models = {"transfusion": _as(ModelRuns, transfusion), "chameleon": _as(ModelRuns, chameleon)}
        self.variants = {name: _as(ModelRuns, v) for name, v in (variants or {}).items()}
        clash = set(self.variants) & set(MODELS)
        if clash or any(not n.replace("_", "").isalnum() for n in self.variants):
            raise ValueError(f"sweep: variant names must be new identifiers, got {sorted(self.variants)}")
        self.models.update(self.variants)
        self.sizes, self.budgets, self.eval_every = sizes, sorted(budgets), eval_every_n_steps
        self.seeds = None if seeds is None else list(seeds)
        self.output = Path(output)
        self.evaluation = dict(evaluation or {})
        self.ema = None if ema is None else dict(ema)
        self.tokenizer, self.vocab_size = _as(Prerequisite, tokenizer), tokenizer_vocab_size
        self.prerequisites = {"autoencoder": _as(Prerequisite, autoencoder), "vqvae": _as(Prerequisite, vqvae),
                              "clip": _as(Prerequisite, clip)}
        if text_model is not None:
            self.prerequisites["text_model"] = _as(Prerequisite, text_model)
        self.ablations = [_as(Ablation, a) for a in ablations or []]
        self.lr_grid = None if lr_grid is None else _as(LearningRateGrid, lr_grid)
        if self.lr_grid is not None:
            self._check_lr_grid()
        self.learning_rates: dict[str, float] = {}  # each model's choice from the grid, once it has run
        self.reference_size = reference_size or list(sizes)[-1]
        self.parity_curve = parity_curve
        self.runs = self._plan()
        self._check_prepared_names()

    # ------------------------------------------------------------------ plan
    def _plan(self) -> list[Run]:
        runs = [self._seeded(Run(f"{model}-{size}-{budget}", model, size, budget, {}), seed)
                for seed in self.seeds or [None] for size in self.sizes for budget in self.budgets
                for model in self.models]
        runs += self._grid_runs()
        known = {r.key(): r for r in runs}
        for ab in self.ablations:
            if ab.model not in self.models:
                raise ValueError(f"sweep: ablation {ab.name!r} names model {ab.model!r}; choose from {list(self.models)}")
            size = ab.size or list(self.sizes)[0]
            if size not in self.sizes:
                raise ValueError(f"sweep: ablation {ab.name!r} names size {size!r}, not one of {list(self.sizes)}")
            budget = ab.budget or self.budgets[0]
            for seed in self.seeds or [None]:
                for setting, overrides in ab.settings.items():
                    run = self._seeded(Run(f"{ab.model}-{size}-{budget}-{_slug(ab.name)}-{_slug(setting)}", ab.model,
                                           size, budget, dict(overrides or {}), ab.name, setting), seed)
                    if run.key() in known:  # the same training as a main run: reuse it
                        run.name = known[run.key()].name
                    runs.append(run)
                    known.setdefault(run.key(), run)
        return runs

    def _seeded(self, run: Run, seed: int | None) -> Run:
        """``run`` at ``seed`` (named ``...-seed<s>``, its seeds overridden before its own overrides); None: as is."""
        if seed is None:
            return run
        seeds = {"seed_everything": seed}
        if _takes_noise_seed(self.models[run.model].config):
            seeds["model.init_args.noise_seed"] = seed
        run.name, run.seed, run.overrides = f"{run.name}-seed{seed}", seed, {**seeds, **run.overrides}
        return run

    def _check_prepared_names(self) -> None:
        """Every ``"{name}"`` in an override names something the sweep prepares."""
        known = {"tokenizer", *self.prerequisites}
        for overrides in [m.overrides for m in self.models.values()] + list(self.sizes.values()) + [
                r.overrides for r in self.runs]:
            for key, value in overrides.items():
                if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] not in known:
                    raise ValueError(f"sweep: override {key}: {value} names nothing the sweep prepares; known: "
                                     f"{sorted(known)} (add a `{value[1:-1]}:` section to prepare it)")

    def _grid_runs(self) -> list[Run]:
        grid = self.lr_grid
        if grid is None:
            return []
        size, budget = self._grid_at()
        if size not in self.sizes:
            raise ValueError(f"sweep: lr_grid names size {size!r}, not one of {list(self.sizes)}")
        seed = self.seeds[0] if self.seeds else None  # the first seed only
        return [self._seeded(Run(f"{model}-{size}-{budget}-lr_{lr:g}", model, size, budget, {"model.init_args.lr": lr},
                                 f"learning rate ({model})", f"lr {lr:g}"), seed)
                for model in MODELS for lr in grid.values]

    def lr_choice(self) -> dict:
        """How the learning rates were chosen, for reports: ``{}`` without a grid."""
        if self.lr_grid is None or not self.learning_rates:
            return {}
        size, budget = self._grid_at()
        return {"values": list(self.lr_grid.values), "metrics": list(self.lr_grid.metrics), "size": size,
                "budget": budget, "chosen": dict(self.learning_rates)}

    def _grid_at(self) -> tuple[str, int]:
        """The size and budget of the learning-rate grid (default: the first of each)."""
        return self.lr_grid.size or list(self.sizes)[0], self.lr_grid.budget or self.budgets[0]

    def _check_lr_grid(self) -> None:
        """Fail before training when the grid cannot choose: no values, no metrics, or a metric not evaluated."""
        from transfusion.lightning.evaluation import DEFAULT_METRICS
        from transfusion.sweep.parity import metric_info

        grid, evaluated = self.lr_grid, self.evaluation.get("metrics", list(DEFAULT_METRICS))
        if not grid.values or not grid.metrics:
            raise ValueError("sweep: lr_grid needs values and metrics")
        needs = {"fid": "fid", "clip_score": "clip", "cider_d": "cider", "ppl": "ppl", "follow": "follow",
                 "captions": "follow", "geneval": "geneval"}
        for metric in grid.metrics:
            metric_info(metric)  # an unknown metric raises, naming the known ones
            if needs[metric.partition("@")[0]] not in evaluated:
                raise ValueError(f"sweep: lr_grid metric {metric!r} needs {needs[metric.partition('@')[0]]!r} in "
                                 f"evaluation.metrics {evaluated}")

    def choose_learning_rates(self, done: dict[str, list[dict]]) -> dict[str, float]:
        """Each model's grid rate with the best mean rank over the final ``lr_grid.metrics``."""
        chosen = {}
        for model in MODELS:
            finals = {run.overrides["model.init_args.lr"]: max(done[run.name], key=lambda e: e["step"])
                      for run in self._grid_runs() if run.model == model}
            chosen[model] = best_by_mean_rank(finals, self.lr_grid.metrics)
        return chosen

    # ------------------------------------------------------------------ prerequisites
    @property
    def needs_clip(self) -> bool:
        return "clip" in self.evaluation.get("metrics", ["clip"])  # the Evaluation callback's default: all metrics

    def prepare(self) -> dict[str, str]:
        """Paths of the tokenizer, the autoencoders and the CLIP, trained here when not given."""
        from transfusion.cli import cli_main, tokenizer_main

        self.output.mkdir(parents=True, exist_ok=True)
        record = self.output / "prepared.json"
        prepared = json.loads(record.read_text()) if record.is_file() else {}
        tok = self.tokenizer.path or prepared.get("tokenizer") or str(self.output / "tokenizer.model")
        if not Path(tok).is_file():
            if self.tokenizer.path:
                raise FileNotFoundError(f"sweep: tokenizer.path {tok!r} does not exist")
            tokenizer_main(["--output", tok, "--vocab_size", str(self.vocab_size)])
        prepared["tokenizer"] = tok
        needed = ["autoencoder", "vqvae"] + (["clip"] if self.needs_clip else []) + (
            ["text_model"] if "text_model" in self.prerequisites else [])
        for name in needed:
            spec = self.prerequisites[name]
            if spec.path:
                if not Path(spec.path).exists():
                    raise FileNotFoundError(f"sweep: {name}.path {spec.path!r} does not exist")
                prepared[name] = spec.path
                continue
            if prepared.get(name) and Path(prepared[name]).exists():
                continue
            if not spec.config:
                raise ValueError(f"sweep: `{name}` needs a `path` or a `config` to train it with")
            root = self.output / name
            rank_zero_info(f"sweep: training the {name} ({spec.config})")
            extra = ["--model.init_args.export_dir", str(root / "model")] if name == "clip" else []
            if name == "text_model":  # trained with the sweep's tokenizer and Transfusion's autoencoder
                extra = ["--model.init_args.tokenizer", tok, "--model.init_args.autoencoder", prepared["autoencoder"]]
            cli = cli_main(["fit", "--config", spec.config, *cli_args(spec.overrides), *extra,
                            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)])
            prepared[name] = str(root / "model") if name == "clip" else cli.trainer.checkpoint_callback.last_model_path
            if name == "text_model":  # the Hugging Face Llama layout: loaded as any pretrained Llama would be
                from transfusion.models.llama import save_llama

                save_llama(cli.model.model, tok, root / "model")
                prepared[name] = str(root / "model")
            write_text(record, json.dumps(prepared, indent=2) + "\n", "sweep record")
        write_text(record, json.dumps(prepared, indent=2) + "\n", "sweep record")
        return prepared

    # ------------------------------------------------------------------ runs
    def run(self) -> list[dict]:
        """Train and evaluate every planned run not done yet; returns all evaluations (one dict each)."""
        prepared = self.prepare()
        done: dict[str, list[dict]] = {}
        unique = list({r.name: r for r in self.runs}.values())
        grid_names = {g.name for g in self._grid_runs()}
        grid = [r for r in unique if r.name in grid_names]
        for i, run in enumerate(grid + [r for r in unique if r not in grid]):
            if run not in grid and self.lr_grid is not None and not self.learning_rates:
                self.learning_rates = self.choose_learning_rates(done)
                rank_zero_info(f"sweep: learning rates from the grid: {self.learning_rates}")
            lr_model = "transfusion" if run.model in self.variants else run.model  # variants: Transfusion's rate
            if run not in grid and lr_model in self.learning_rates:  # the grid's choice, unless the run sets its own
                run.overrides = {"model.init_args.lr": self.learning_rates[lr_model], **run.overrides}
            done[run.name] = self._run_once(run, prepared, f"{i + 1}/{len(unique)}")
        rows = []
        for run in self.runs:
            for ev in done[run.name]:
                rows.append({"run": run.name, "model": run.model, "size": run.size, "budget": run.budget,
                             "ablation": run.ablation or "", "setting": run.setting or "", "seed": run.seed, **ev})
        return rows

    def _run_once(self, run: Run, prepared: dict, counter: str) -> list[dict]:
        """The run's evaluations: trained now, or read back when a run of the same settings finished before."""
        path, args = self.output / "runs" / run.name / "evaluations.json", self.fit_args(run, prepared)
        if path.is_file():
            record = json.loads(path.read_text())
            # the same training command (records without one: the same overrides)
            if record.get("args", args) == args and record["run"]["overrides"] == run.overrides:
                rank_zero_info(f"sweep: run {counter} {run.name}: done before, reusing {path}")
                return record["evaluations"]
            rank_zero_info(f"sweep: run {counter} {run.name}: settings changed since {path}, training again")
        rank_zero_info(f"sweep: run {counter} {run.name} ({run.budget} steps)")
        start = time.perf_counter()
        evaluations = self._train(args)
        wall = time.perf_counter() - start
        # whole or not at all: a record torn by a full disk or a kill would break the resume (transfusion.atomic)
        write_text(path, json.dumps({"run": asdict(run), "args": args, "wall_s": wall, "evaluations": evaluations},
                                    indent=2) + "\n", "sweep record")
        return evaluations

    def fit_args(self, run: Run, prepared: dict) -> list[str]:
        """The ``transfusion fit`` command line of ``run``: model YAML, overrides, budget, Evaluation callback."""
        root = self.output / "runs" / run.name
        spec = self.models[run.model]
        autoencoder = prepared["vqvae" if run.model == "chameleon" else "autoencoder"]
        evaluation = {**self.evaluation, "every_n_train_steps": self.eval_every, "at_train_end": True,
                      "on_test": False, "on_validation": False, "output_dir": str(root / "evaluation")}
        if self.needs_clip:
            evaluation["clip_model"] = prepared["clip"]
        callback = {"class_path": "transfusion.lightning.evaluation.Evaluation", "init_args": evaluation}
        model, size, own = ({k: _prepared_path(v, prepared) for k, v in overrides.items()}
                             for overrides in (spec.overrides, self.sizes[run.size], run.overrides))
        ema = [] if self.ema is None else [  # before Evaluation, which then evaluates the EMA weights
            f"--trainer.callbacks+={json.dumps({'class_path': 'transfusion.lightning.ema.EMA', 'init_args': self.ema})}"]
        return ["fit", "--config", spec.config, *cli_args(model), *cli_args(size), *cli_args(own),
                "--model.init_args.tokenizer", prepared["tokenizer"], "--model.init_args.autoencoder", autoencoder,
                "--trainer.max_steps", str(run.budget), "--trainer.val_check_interval", str(run.budget),
                "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                *ema, f"--trainer.callbacks+={json.dumps(callback)}"]

    def _train(self, args: list[str]) -> list[dict]:
        """Run one ``transfusion fit`` command line; its Evaluation callback's reports."""
        from transfusion.cli import cli_main
        from transfusion.lightning.evaluation import Evaluation

        cli = cli_main(args)
        callbacks = [c for c in cli.trainer.callbacks if isinstance(c, Evaluation)]
        evaluations = []
        for report in callbacks[-1].history:
            evaluations.append({"step": report["training_steps"], "params": cli.model.flop_counter.params,
                                "tokens": report["training_tokens"], "flops": report["training_flops"],
                                "flops_exact": report["training_flops_exact"], **report["metrics"]})
        return evaluations


def _check_arguments(sizes: dict, budgets: list[int], eval_every_n_steps: int, reference_size: str | None,
                     seeds: list[int] | None, parity_curve: str) -> None:
    """``Sweep``'s arguments that need no file: a ValueError naming the bad one."""
    if not sizes or not budgets:
        raise ValueError("sweep: `sizes` and `budgets` must not be empty")
    if any(b < 1 for b in budgets) or eval_every_n_steps < 1:
        raise ValueError(f"sweep: budgets {budgets} and eval_every_n_steps {eval_every_n_steps} must be >= 1")
    if reference_size is not None and reference_size not in sizes:
        raise ValueError(f"sweep: reference_size {reference_size!r} is not one of sizes {list(sizes)}")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ValueError(f"sweep: seeds must be distinct integers, at least one, got {seeds}")
    if parity_curve not in ("all_sizes", "same_size"):
        raise ValueError(f"sweep: parity_curve must be 'all_sizes' or 'same_size', got {parity_curve!r}")


def _as(cls, value):
    """A dataclass from a dict (Python callers), itself, or its defaults for None."""
    return cls() if value is None else cls(**value) if isinstance(value, dict) else value


def _prepared_path(value, prepared: dict):
    """``"{text_model}"``: the path prepared under that name; any other value as it is."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in prepared:
        return prepared[value[1:-1]]
    return value


def _takes_noise_seed(config: str) -> bool:
    """Whether the model class of a training YAML has a ``noise_seed`` argument (Transfusion's, not Chameleon's)."""
    import importlib
    import inspect

    import yaml

    with open(config) as f:
        class_path = (yaml.safe_load(f) or {}).get("model", {}).get("class_path", "")
    module, _, name = class_path.rpartition(".")
    if not module:
        return False
    cls = getattr(importlib.import_module(module), name)
    return "noise_seed" in inspect.signature(cls.__init__).parameters


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
