"""``bench/estimate_lmfusion.py`` builds Llama 3.2 1B and Qwen2.5 0.5B from their published config.json fields through
``read_llama_config`` on the meta device: the parameter counts equal the published ones, and the memory and speed
columns follow their formulas."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "estimate_lmfusion.py"
# the models' parameter counts (safetensors metadata of the Hub repos; tied embeddings counted once)
PUBLISHED = {"Llama-3.2-1B": 1_235_814_400, "Qwen2.5-0.5B": 494_032_768}


def test_estimates_count_the_published_models(capsys):
    spec = importlib.util.spec_from_file_location("estimate_lmfusion", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = type("Args", (), {"rows_per_gpu": 2, "seq_len": 4096, "caption_tokens": 32, "mfu": 0.4})
    for llm, total in PUBLISHED.items():
        _, fields, appended = script.LLMS[llm]
        V, D = fields["vocab_size"], fields["hidden_size"]
        sdxl, flux = (script.estimate(llm, vae, args) for vae in script.VAES)
        # ours: the LM head apart from the embedding (tied in the LLM), both with rows for the appended specials
        assert sdxl["text"] == total + V * D + 2 * appended * D
        assert sdxl["image"] == total - V * D  # the body's copy: every block weight and the final norm
        assert sdxl["N"] == sdxl["image"] + sdxl["patch"] and sdxl["trained"] == sdxl["N"] + 2 * appended * D
        assert flux["patch"] > sdxl["patch"] and flux["text"] == sdxl["text"]  # 16 latent channels, not 4
        states_1 = (4 * sdxl["frozen"] + 16 * sdxl["trained"]) / 2**30
        assert sdxl["states_1"] == pytest.approx(states_1) and sdxl["states_8"] == pytest.approx(states_1 / 8)
        assert sdxl["mem_8_ckpt"] < sdxl["mem_8_full"] < sdxl["mem_1_full"] < 80  # fits an H100
        assert sdxl["tokens_per_s_8"] == pytest.approx(8 * sdxl["tokens_per_s_1"])
        assert sdxl["flops_per_position"] > 6 * sdxl["N"]  # + attention
    script.main([])
    assert "| Llama-3.2-1B + FLUX VAE |" in capsys.readouterr().out
