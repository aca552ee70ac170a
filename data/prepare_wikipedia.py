"""English Wikipedia articles as a JSON Lines text corpus, from the shortened dump in the gensim wheel.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` in the
``gensim==4.4.0`` wheel on PyPI (gensim's code is LGPL-2.1; the text is Wikipedia's, CC BY-SA 3.0,
https://en.wikipedia.org/wiki/Wikipedia:Copyrights): a MediaWiki XML export of 206 pages. Redirects and
non-article namespaces are dropped; wiki markup is reduced to plain text (templates, tables, references,
files and categories removed, links replaced by their text). Output: one ``{"title", "text"}`` object per
article, the last ``--val_articles`` in ``validation.jsonl``::

    python data/prepare_wikipedia.py --output outputs/data/wikipedia     # needs pip access to PyPI only

Train on it with ``TextFilesSource(paths: outputs/data/wikipedia/train.jsonl, val_paths: .../validation.jsonl)``.
On a connected machine the full corpus is ``HubTextSource(name: wikimedia/wikipedia, config: 20231101.en)``.
"""

import argparse
import bz2
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from wheels import read_from_wheel  # noqa: E402

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _drop_nested(text: str, start: str, end: str) -> str:
    """Remove (possibly nested) ``start ... end`` spans, e.g. templates ``{{ ... }}`` and tables ``{| ... |}``."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(start, i):
            depth, i = depth + 1, i + len(start)
        elif depth and text.startswith(end, i):
            depth, i = depth - 1, i + len(end)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def plain_text(wiki: str) -> str:
    text = html.unescape(wiki)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<gallery.*?</gallery>", "", text, flags=re.S | re.I)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(_drop_nested(text, "{{", "}}"), "{|", "|}")
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)        # [[target|text]] -> text
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", text)  # external links
    text = re.sub(r"<[^>]+>", "", text)                                    # remaining tags
    text = re.sub(r"'{2,}", "", text)                                      # bold / italics
    text = re.sub(r"^=+[ \t]*(.*?)[ \t]*=+[ \t]*$", r"\1.", text, flags=re.M)  # headings (alone: dropped below)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)                    # list markers
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
    return "\n".join(p for p in paragraphs if len(p.split()) >= 5)


def articles(dump: bytes):
    ns = ""
    for _, element in ET.iterparse(__import__("io").BytesIO(bz2.decompress(dump)), events=("end",)):
        tag = element.tag.rsplit("}", 1)[-1]
        if tag != "page":
            continue
        ns = element.tag[: -len("page")]
        title = element.findtext(f"{ns}title")
        if element.findtext(f"{ns}ns") == "0" and element.find(f"{ns}redirect") is None:
            text = plain_text(element.findtext(f"{ns}revision/{ns}text") or "")
            if len(text.split()) >= 50:
                yield {"title": title, "text": text}
        element.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/data/wikipedia")
    parser.add_argument("--wheel", default=None, help="an already downloaded gensim wheel (skips pip download)")
    parser.add_argument("--val_articles", type=int, default=20)
    args = parser.parse_args()
    dump = read_from_wheel("gensim==4.4.0", [MEMBER], args.wheel)[MEMBER]
    docs = list(articles(dump))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", docs[: -args.val_articles]), ("validation", docs[-args.val_articles:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in part), encoding="utf-8")
    words = sum(len(d["text"].split()) for d in docs)
    print(f"wrote {out}/train.jsonl and validation.jsonl: {len(docs)} articles, {words} words")


if __name__ == "__main__":
    main()
