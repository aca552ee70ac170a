"""A sweep over seeds: every main run, variant and ablation setting once per seed, the learning-rate grid at the
first seed; Table 3 and the ablations as mean +- standard deviation, parity ratios computed per seed."""

import csv
import statistics
from pathlib import Path

import pytest

from transfusion.sweep.report import ablation_tables, ablations_markdown, metric_keys, table3, table3_markdown
from transfusion.sweep.runner import Sweep

CONFIGS = Path(__file__).resolve().parents[1] / "lightning_configs"
TF = {"config": str(CONFIGS / "transfusion_embedded.yaml")}
CH = {"config": str(CONFIGS / "chameleon_embedded.yaml")}


def test_every_run_once_per_seed_with_its_seeds_overridden():
    sweep = Sweep(TF, CH, {"S": {}}, [4], 2, seeds=[0, 5],
                  ablations=[{"name": "attn", "settings": {"bi": {}, "causal": {"model.init_args.bidirectional_images": False}}}],
                  lr_grid={"values": [1e-3, 3e-3], "metrics": ["fid"]})
    runs = {(r.name, r.ablation, r.setting): r for r in sweep.runs}
    main = [r for r in sweep.runs if r.ablation is None]
    assert sorted(r.name for r in main) == ["chameleon-S-4-seed0", "chameleon-S-4-seed5",
                                            "transfusion-S-4-seed0", "transfusion-S-4-seed5"]
    tf5 = runs["transfusion-S-4-seed5", None, None]
    assert tf5.seed == 5 and tf5.overrides == {"seed_everything": 5, "model.init_args.noise_seed": 5}
    # Chameleon's module has no noise_seed: only the global seed
    assert runs["chameleon-S-4-seed5", None, None].overrides == {"seed_everything": 5}
    # the ablation's `{}` setting is the main run of the same seed, reused by name; its other setting per seed
    assert runs["transfusion-S-4-seed5", "attn", "bi"].seed == 5
    causal = runs["transfusion-S-4-attn-causal-seed5", "attn", "causal"]
    assert causal.overrides == {"seed_everything": 5, "model.init_args.noise_seed": 5,
                                "model.init_args.bidirectional_images": False}
    # the learning-rate grid at the first seed only
    grid = [r for r in sweep.runs if r.ablation and r.ablation.startswith("learning rate")]
    assert len(grid) == 4 and {r.seed for r in grid} == {0}
    assert sum(r.name == "transfusion-S-4-lr_0.001-seed0" for r in grid) == 1
    # the command line carries the seeds
    args = sweep.fit_args(tf5, {"tokenizer": "t.model", "autoencoder": "a.ckpt", "vqvae": "v.ckpt", "clip": "c"})
    assert args[args.index("--seed_everything") + 1] == "5" and args[args.index("--model.init_args.noise_seed") + 1] == "5"


def test_seeds_must_be_distinct():
    with pytest.raises(ValueError, match="seeds must be distinct"):
        Sweep(TF, CH, {"S": {}}, [4], 2, seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        Sweep(TF, CH, {"S": {}}, [4], 2, seeds=[])


def _rows(seed, tf_fids, ch_fid, ablation_fid=None):
    """Transfusion evaluated at 1e9, 2e9, 4e9 FLOPs; Chameleon's final FID at 4e9."""
    rows = [{"run": f"transfusion-S-4-seed{seed}", "model": "transfusion", "size": "S", "budget": 4, "ablation": "",
             "setting": "", "seed": seed, "step": i + 1, "params": 10, "tokens": 100, "flops": f, "flops_exact": f,
             "fid": v, "ppl": 30.0 + seed} for i, (f, v) in enumerate(zip([1e9, 2e9, 4e9], tf_fids))]
    rows.append({"run": f"chameleon-S-4-seed{seed}", "model": "chameleon", "size": "S", "budget": 4, "ablation": "",
                 "setting": "", "seed": seed, "step": 3, "params": 10, "tokens": 100, "flops": 4e9, "flops_exact": 4e9,
                 "fid": ch_fid, "ppl": 40.0})
    if ablation_fid is not None:
        rows.append({**rows[2], "run": f"x-seed{seed}", "ablation": "attn", "setting": "causal", "fid": ablation_fid})
        rows.append({**rows[2], "ablation": "attn", "setting": "bi"})
    return rows


def test_table3_over_seeds_is_the_mean_of_per_seed_tables_with_parity_per_seed():
    per_seed = {0: _rows(0, [100, 80, 60], 80, 70), 1: _rows(1, [110, 90, 70], 90, 75), 2: _rows(2, [120, 100, 66], 100, 90)}
    rows = [r for rs in per_seed.values() for r in rs]
    t = table3(rows, "S")
    assert t["seeds"] == [0, 1, 2]
    fid = next(r for r in t["rows"] if r["metric"] == "fid")
    assert fid["transfusion"] == pytest.approx(statistics.fmean([60, 70, 66]))
    assert fid["transfusion_std"] == pytest.approx(statistics.stdev([60, 70, 66]))
    assert fid["chameleon"] == pytest.approx(90) and fid["chameleon_std"] == pytest.approx(10)
    # each seed's ratio is that seed's own table (its Transfusion curve against its Chameleon)
    ratios = [next(r for r in table3(per_seed[s], "S")["rows"] if r["metric"] == "fid")["parity_ratio"] for s in (0, 1, 2)]
    assert fid["parity_ratios"] == pytest.approx(ratios) and ratios[0] == pytest.approx(0.5)  # 80 reached at 2e9
    assert fid["parity_ratio"] == pytest.approx(statistics.fmean(ratios))
    markdown = table3_markdown(t)
    assert "Seeds 0, 1, 2" in markdown and f"| FID | lower | {statistics.fmean([60, 70, 66]):.4g} ± " in markdown
    assert f"| {statistics.fmean(ratios):.3g} ± {statistics.stdev(ratios):.2g} |" in markdown


def test_a_seed_without_a_ratio_is_reported_per_seed():
    rows = _rows(0, [100, 80, 60], 80) + _rows(1, [100, 95, 85], 90)
    rows += _rows(2, [100, 99, 98], 50)  # seed 2 never reaches Chameleon's 50
    fid = next(r for r in table3(rows, "S")["rows"] if r["metric"] == "fid")
    assert fid["parity_ratio"] is None and fid["parity_statuses"] == ["interpolated", "interpolated", "not_reached"]
    assert fid["parity_text"].startswith("seed 0: 0.5; seed 1: ") and "seed 2: not reached (best 98" in fid["parity_text"]


def test_one_seed_gives_the_table_of_a_sweep_without_seeds():
    rows = _rows(3, [100, 80, 60], 80)
    unseeded = [{**r, "seed": None} for r in rows]
    assert table3(rows, "S") == table3(unseeded, "S")
    assert "±" not in table3_markdown(table3(rows, "S"))


def test_ablations_over_seeds_give_mean_and_spread(tmp_path):
    rows = _rows(0, [100, 80, 60], 80, 70) + _rows(1, [110, 90, 70], 90, 76)
    table = ablation_tables(rows)[0]
    causal = next(s for s in table["settings"] if s["setting"] == "causal")
    assert causal["seeds"] == [0, 1] and causal["fid"] == pytest.approx(73)
    assert causal["std"]["fid"] == pytest.approx(statistics.stdev([70, 76]))
    assert "| attn | transfusion | S | 4 | causal | 30.5 ± 0.71 | 73 ± 4.2 |" in ablations_markdown(
        [table], metric_keys(rows))


def test_results_csv_has_the_seed_of_every_row(tmp_path, monkeypatch):
    from transfusion.sweep import report

    monkeypatch.setattr(report, "plot_scaling", lambda rows, path: None)  # matplotlib is not the subject here
    rows = _rows(0, [100, 80, 60], 80) + _rows(1, [110, 90, 70], 90)
    report.write_report(rows, tmp_path, "S")
    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["seed"] for r in written] == ["0"] + ["1"] + ["0"] * 3 + ["1"] * 3  # chameleon first, by seed
    assert "Seeds 0, 1" in (tmp_path / "table3.md").read_text()
