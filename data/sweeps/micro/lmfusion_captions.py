"""The LMFusion row again, from a text model pretrained on the news text *and* the captions' language.

Run after the sweep (it reuses the sweep's tokenizer, autoencoder, CLIP and the LMFusion run's command line):
    python data/sweeps/micro/lmfusion_captions.py outputs/sweeps/micro outputs/lmfusion_captions
Writes OUT/news_and_captions.txt (the news training documents and every caption template x attribute, 10 times,
about as many words; the held-out news stays held out), trains the text model on it with
text_model_embedded.yaml, exports it with `transfusion export --llama`, then trains and evaluates the LMFusion
run of the sweep with that text model (OUT/run/evaluation/evaluation.json).
"""

import json
import random
import sys
from pathlib import Path

from transfusion.cli import cli_main
from transfusion.data.embedded.shapes import all_captions
from transfusion.data.embedded.text import read_documents, split_documents
from transfusion.export import export_main

LMFUSION_RUN = "transfusion_mot-S-600-text_weights__mot-pretrained_text_model__frozen__lmfusion"

sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
train, held_out = split_documents(read_documents(None))
documents = train + all_captions() * 10
random.Random(0).shuffle(documents)
(out / "news_and_captions.txt").write_text("\n".join(documents + held_out) + "\n")

prepared = json.loads((sweep / "prepared.json").read_text())
text_root = out / "text_model"
cli = cli_main(["fit", "--config", "lightning_configs/text_model_embedded.yaml",
                "--model.init_args.tokenizer", prepared["tokenizer"], "--model.init_args.autoencoder",
                prepared["autoencoder"], "--data.init_args.text_path", str(out / "news_and_captions.txt"),
                "--trainer.default_root_dir", str(text_root), "--trainer.logger.init_args.save_dir", str(text_root)])
export_main(["--llama", "--ckpt_path", cli.trainer.checkpoint_callback.last_model_path,
             "--output", str(text_root / "llama")])

args = json.loads((sweep / "runs" / LMFUSION_RUN / "evaluations.json").read_text())["args"]
args = [a.replace(prepared["text_model"], str(text_root / "llama")).replace(str(sweep / "runs" / LMFUSION_RUN),
                                                                            str(out / "run")) for a in args]
cli_main(args)
