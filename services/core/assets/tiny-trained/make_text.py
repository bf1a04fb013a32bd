#!/usr/bin/env python3
"""Extract the prose of the Rust book (Debian package rust-doc, MIT OR Apache-2.0) as ASCII text.

    apt-get download rust-doc && dpkg-deb -x rust-doc_*.deb /tmp/rustdoc
    python3 make_text.py /tmp/rustdoc/usr/share/doc/rust-doc/html/book OUT_DIR

Writes OUT_DIR/train.txt and OUT_DIR/heldout.txt: one paragraph per line, from every chapter
section (ch*.html, the book's current edition; the old-edition redirect pages are skipped).
Code listings (<pre>) and the page chrome outside <main> are dropped: the model is meant to
write English prose. Text is folded to ASCII (curly quotes, dashes) so that a byte-level token
is never half of a UTF-8 character. Every HELDOUT_EVERY-th section (sorted by file name,
starting at HELDOUT_OFFSET) goes to heldout.txt and is never trained on.
"""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

HELDOUT_EVERY = 12
HELDOUT_OFFSET = 5
BLOCK = {"p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "dt", "dd", "tr", "div"}
SKIP = {"pre", "script", "style", "nav", "svg"}
FOLD = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " - ",
        "\u2013": "-", "\u2026": "...", "\u00a0": " ", "\u2192": "->", "\u00d7": "x"}


class Prose(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.in_main = False
        self.skip = 0
        self.paras: list[str] = []
        self.cur: list[str] = []

    def flush(self) -> None:
        text = " ".join("".join(self.cur).split())
        if text:
            self.paras.append(text)
        self.cur = []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.in_main = True
        elif tag in SKIP:
            self.skip += 1
        elif tag in BLOCK or tag == "br":
            self.flush()

    def handle_endtag(self, tag):
        if tag == "main":
            self.flush()
            self.in_main = False
        elif tag in SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in BLOCK:
            self.flush()

    def handle_data(self, data):
        if self.in_main and not self.skip:
            self.cur.append(data)


def ascii_fold(s: str) -> str:
    s = "".join(FOLD.get(c, c) for c in s)
    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode("ascii")
    return " ".join(s.split())


def paragraphs(path: Path) -> list[str]:
    p = Prose()
    p.feed(path.read_text(encoding="utf-8"))
    out = []
    for para in p.paras:
        t = ascii_fold(html.unescape(para))
        # Listing captions and file names alone on a line are not prose.
        if len(t.split()) < 4 or t.startswith("Filename:"):
            continue
        out.append(t)
    return out


def main() -> None:
    book, out = Path(sys.argv[1]), Path(sys.argv[2])
    files = sorted(book.glob("ch[0-9][0-9]-*.html"))
    if not files:
        sys.exit(f"no ch*.html under {book}")
    train, held, held_names = [], [], []
    for i, f in enumerate(files):
        paras = paragraphs(f)
        if i % HELDOUT_EVERY == HELDOUT_OFFSET:
            held += paras
            held_names.append(f.name)
        else:
            train += paras
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n".join(train) + "\n")
    (out / "heldout.txt").write_text("\n".join(held) + "\n")
    print(f"{len(files)} sections; held out {held_names}")


if __name__ == "__main__":
    main()
