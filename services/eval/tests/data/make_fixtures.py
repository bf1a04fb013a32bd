"""Writes the small shipped datasets the dsv2-eval and `dsv2 summarize`/`dsv2 mmlu` tests use.

The articles, summaries and questions below were written for these tests (no third-party
text). One source of truth, three formats: articles.jsonl (json), articles.csv (csv module) and
articles.parquet (pyarrow, the library Hugging Face datasets writes parquet with; snappy is its
default codec). Also writes the bad-data files and a tiny MMLU directory in the hendrycks layout.

    python -m venv /tmp/pq && /tmp/pq/bin/pip install pyarrow
    /tmp/pq/bin/python services/eval/tests/data/make_fixtures.py
"""
import csv
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))

ARTICLES = [
    ("The city council of Riverton voted on Tuesday to build a new footbridge over the Ash river. "
     "The bridge will link the old market with the railway station and is expected to open in two years. "
     "Council members said the project would cost about 4.2 million pounds, paid mostly by a regional grant.",
     "Riverton council approves a footbridge over the Ash river.\nThe bridge links the market and the station and opens in two years."),
    ("A small bakery in the village of Elm Hollow has won a national prize for its rye bread. "
     "The owner, Marta Lind, said she did n't expect to win and had entered the contest \"just for fun\". "
     "The bakery uses a sourdough starter that is more than forty years old.",
     "Elm Hollow bakery wins national prize for rye bread.\nOwner Marta Lind did not expect to win."),
    ("Scientists at a northern observatory reported a bright comet that should be visible to the naked eye next month. "
     "The comet, named C/2031 K2, will pass closest to the Sun on the 14th. "
     "Astronomers advise looking low in the western sky shortly after sunset, away from city lights.",
     "A bright comet will be visible to the naked eye next month.\nLook low in the western sky after sunset."),
    ("The regional football final ended 3-2 after extra time, with the visiting side scoring twice in the last ten minutes. "
     "Fans celebrated in the streets until late at night. The coach praised the team's patience, saying: "
     "\"We kept the ball, we kept calm, and the goals came.\"",
     "Visitors win the regional football final 3-2 after extra time.\nThe coach praised the team's patience."),
    ("Heavy rain caused flooding on the coastal road between Porthwen and Carrick on Sunday, and the road was closed for six hours. "
     "No one was injured. Engineers will inspect the drains this week, and residents have been asked to report blocked gullies.",
     "Flooding closed the Porthwen–Carrick coastal road for six hours.\nNo injuries; drains to be inspected."),
    ("Le musée municipal rouvre ses portes après deux ans de travaux. Visitors can now see the restored café, "
     "a new gallery of maps, and a collection of 1,200 postcards donated by a local family. Entry remains free on Sundays.",
     "The municipal museum reopens after two years of work.\nNew map gallery and 1,200 donated postcards; free entry on Sundays."),
]

# (subject, dev questions, test questions); each question: (text, [A, B, C, D], answer letter)
MMLU = {
    "abstract_algebra": (
        [("How many elements does the group Z_6 have?", ["2", "3", "6", "12"], "C"),
         ("Which of these groups is cyclic?", ["Z_4", "Z_2 x Z_2", "S_3", "the quaternion group"], "A"),
         ("The identity element of (Z, +) is", ["1", "0", "-1", "none"], "B"),
         ("What is the order of 2 in Z_5 under addition?", ["1", "2", "4", "5"], "D"),
         ("A group of prime order is always", ["trivial", "cyclic", "non-abelian", "infinite"], "B")],
        [("How many elements does S_3 have?", ["3", "6", "9", "27"], "B"),
         ("Is every subgroup of an abelian group normal?", ["Yes", "No", "Only if finite", "Only if cyclic"], "A"),
         ("Statement: \"every field is a ring\", is it", ["true", "false", "true only in characteristic 0", "undecidable"], "A"),
         ("What is the order of 3 in the multiplicative group of Z_7?", ["2", "3", "6", "7"], "C")]),
    "anatomy": (
        [("Which bone is in the upper arm?", ["femur", "humerus", "tibia", "radius"], "B"),
         ("How many chambers does the human heart have?", ["two", "three", "four", "five"], "C"),
         ("The largest organ of the body is the", ["liver", "brain", "skin", "lung"], "C"),
         ("Which muscle separates the chest from the abdomen?", ["diaphragm", "deltoid", "biceps", "soleus"], "A"),
         ("The kneecap is also called the", ["scapula", "patella", "clavicle", "sternum"], "B")],
        [("Where is the femur?", ["arm", "skull", "thigh", "foot"], "C"),
         ("Which organ filters blood to make urine?", ["kidney", "stomach", "spleen", "heart"], "A"),
         ("The cornea is part of the", ["ear", "eye", "nose", "tongue"], "B"),
         ("Red blood cells are made mainly in the\nbone marrow of adults; true or false?", ["true", "false", "only in children", "never"], "A"),
         ("How many pairs of ribs do humans usually have?", ["10", "11", "12", "13"], "C")]),
    "high_school_geography": (
        [("Which is the longest river in Europe?", ["Danube", "Volga", "Rhine", "Loire"], "B"),
         ("A delta forms at a river's", ["source", "mouth", "bend", "waterfall"], "B"),
         ("Which line is at 0 degrees latitude?", ["Equator", "Prime Meridian", "Tropic of Cancer", "Arctic Circle"], "A"),
         ("Population density is people per", ["household", "unit of area", "year", "city"], "B"),
         ("Which climate has the least rain?", ["tropical", "desert", "temperate", "monsoon"], "B")],
        [("Which ocean is the largest?", ["Atlantic", "Indian", "Arctic", "Pacific"], "D"),
         ("A map's scale of 1:50,000 means 1 cm is", ["50 m", "500 m", "5 km", "50 km"], "B"),
         ("Lines of longitude meet at the", ["equator", "poles", "tropics", "oceans"], "B")]),
}


def write_articles():
    with open(os.path.join(HERE, "articles.jsonl"), "w", encoding="utf-8") as f:
        for i, (a, h) in enumerate(ARTICLES):
            # Extra columns (id) are ignored by the reader, as in the real dataset.
            f.write(json.dumps({"id": f"s{i}", "article": a, "highlights": h}, ensure_ascii=False) + "\n")
    with open(os.path.join(HERE, "articles.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "highlights", "article"])  # column order differs on purpose
        for i, (a, h) in enumerate(ARTICLES):
            w.writerow([f"s{i}", h, a])
    table = pa.table({
        "article": [a for a, _ in ARTICLES],
        "highlights": [h for _, h in ARTICLES],
        "id": [f"s{i}" for i in range(len(ARTICLES))],
    })
    pq.write_table(table, os.path.join(HERE, "articles.parquet"))  # snappy by default


def write_bad():
    bad = os.path.join(HERE, "bad")
    os.makedirs(bad, exist_ok=True)
    with open(os.path.join(bad, "missing_highlights.jsonl"), "w") as f:
        f.write(json.dumps({"article": "one", "highlights": "two"}) + "\n")
        f.write(json.dumps({"article": "three"}) + "\n")
    with open(os.path.join(bad, "missing_column.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["article", "summary"])
        w.writerow(["a", "b"])
    open(os.path.join(bad, "empty.jsonl"), "w").close()
    open(os.path.join(bad, "empty.csv"), "w").close()
    open(os.path.join(bad, "empty.parquet"), "w").close()
    pq.write_table(pa.table({"article": ["x"], "summary": ["y"]}),
                   os.path.join(bad, "missing_column.parquet"))
    # MMLU: Q2 spans lines 2-3, so the row with 5 options (7 fields) starts on line 4.
    mm = os.path.join(bad, "mmlu_five_options", "test")
    os.makedirs(mm, exist_ok=True)
    with open(os.path.join(mm, "anatomy_test.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Q1", "a", "b", "c", "d", "A"])
        w.writerow(["Q2 spans\ntwo lines", "a", "b", "c", "d", "B"])
        w.writerow(["Q3", "a", "b", "c", "d", "e", "C"])  # line 4: five options
    mm = os.path.join(bad, "mmlu_bad_answer", "test")
    os.makedirs(mm, exist_ok=True)
    with open(os.path.join(mm, "anatomy_test.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Q1", "a", "b", "c", "d", "E"])


def write_mmlu():
    root = os.path.join(HERE, "mmlu")
    for split in ("dev", "test"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
    for subject, (dev, test) in MMLU.items():
        for split, rows in (("dev", dev), ("test", test)):
            # No header, like the hendrycks files; csv quotes fields with commas/newlines.
            with open(os.path.join(root, split, f"{subject}_{split}.csv"), "w", newline="") as f:
                w = csv.writer(f)
                for q, opts, ans in rows:
                    w.writerow([q, *opts, ans])


if __name__ == "__main__":
    write_articles()
    write_bad()
    write_mmlu()
