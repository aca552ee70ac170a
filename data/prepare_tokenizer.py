"""The Llama 2 SentencePiece tokenizer (the paper's tokenizer family), from the mistral-common wheel.

Source: ``mistral_common/data/tokenizer.model.v1`` in the ``mistral-common==1.13.1`` wheel on PyPI
(Apache-2.0): 32,000 pieces in the Llama 2 layout (unk 0, bos 1, eos 2, byte fallback 3-258). It has no
PAD, BOI or EOI: ``transfusion.data.tokenizer.Tokenizer`` appends them as ids 32000-32002, after the last
piece, so no existing piece changes meaning and no text can produce them::

    python data/prepare_tokenizer.py --output outputs/data/llama2.model    # PyPI access only

then ``--model.init_args.tokenizer outputs/data/llama2.model`` (the model's vocabulary becomes 32,003).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from wheels import read_from_wheel  # noqa: E402

MEMBER = "mistral_common/data/tokenizer.model.v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/data/llama2.model")
    parser.add_argument("--wheel", default=None, help="an already downloaded mistral-common wheel")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(read_from_wheel("mistral-common==1.13.1", [MEMBER], args.wheel)[MEMBER])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transfusion.data.tokenizer import Tokenizer

    tok = Tokenizer(out)
    print(f"wrote {out}: {tok.sp.get_piece_size()} pieces; with specials {tok.vocab_size} ids "
          f"(bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}, boi {tok.boi_id}, eoi {tok.eoi_id})")


if __name__ == "__main__":
    main()
