"""Reference CIDEr-D values for tests/data/cider_cases.json from pycocoevalcap 1.2 (the COCO evaluation code).

    python tests/data/make_cider_reference.py   # writes tests/data/cider_reference.json
"""

import json
from pathlib import Path

from pycocoevalcap.cider.cider import Cider

here = Path(__file__).parent
cases = json.loads((here / "cider_cases.json").read_text())
gts = {i: refs for i, refs in enumerate(cases["references"])}
res = {i: [c] for i, c in enumerate(cases["candidates"])}
score, scores = Cider().compute_score(gts, res)
out = {"source": "pycocoevalcap 1.2, Cider(n=4, sigma=6.0).compute_score", "corpus": float(score),
       "per_candidate": [float(s) for s in scores]}
(here / "cider_reference.json").write_text(json.dumps(out, indent=2) + "\n")
print(out)
