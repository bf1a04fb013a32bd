#!/usr/bin/env python3
"""Generate the expected values the dsv2-rouge tests compare against.

Run from anywhere (needs rouge-score 0.1.2 and nltk, e.g. /opt/hfvenv):

    /opt/hfvenv/bin/python services/rouge/tests/data/make_expected.py

Writes, next to this script:
  rouge_expected.jsonl       one object per (prediction, reference) pair with the
                             [precision, recall, fmeasure] of rouge1, rouge2,
                             rougeL and rougeLsum from rouge_scorer.RougeScorer,
                             without ("plain") and with ("stemmed") the stemmer.
  rouge_expected_mean.json   the mean over all pairs of every value (what
                             dsv2_rouge::aggregate reports) and, for reference
                             only, BootstrapAggregator's "mid" with a fixed seed.
  predictions.txt,           the same texts, one per line, escaped as
  references.txt             dsv2_rouge::read_lines_file expects (\\n, \\r, \\\\).
  porter_stems.tsv           word<TAB>nltk PorterStemmer().stem(word) for a few
                             thousand words.

Everything is generated offline and deterministically (fixed seeds; the word
list comes from this script, Python's bundled pydoc topics and nltk's own
porter.py docstrings), so re-running gives identical files for the same
Python / rouge-score / nltk versions.
"""

import importlib.metadata
import inspect
import json
import pathlib
import random
import re

import nltk
import numpy as np
import pydoc_data.topics
from nltk.stem import porter as nltk_porter
from rouge_score import rouge_scorer, scoring

OUT = pathlib.Path(__file__).resolve().parent
TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

rng = random.Random(20240607)

# Families of words whose stems collide (or almost do) under Porter.
FAMILIES = [
    ["run", "running", "runs", "ran", "runner", "runners"],
    ["generous", "generously", "generosity", "generate", "generation", "general"],
    ["relation", "relational", "relate", "relating", "related", "relative", "relatively"],
    ["connect", "connected", "connecting", "connection", "connections", "connective"],
    ["happy", "happiness", "happily", "happier", "unhappy"],
    ["die", "dying", "died", "dies", "dead", "death"],
    ["fly", "flies", "flying", "flied", "flight", "flew"],
    ["sky", "skies", "news", "inning", "innings", "outing", "outings"],
    ["proceed", "proceeded", "proceeding", "exceed", "exceeds", "succeed", "succeeded"],
    ["hope", "hopeful", "hopefully", "hopefulness", "hoping", "hoped"],
    ["compute", "computer", "computing", "computation", "computational", "computed"],
    ["organize", "organization", "organizational", "organizer", "organized"],
    ["sense", "sensible", "sensibility", "sensitive", "sensitivity", "sensation"],
    ["form", "formal", "formality", "formalize", "formative", "formation"],
    ["electric", "electrical", "electricity", "electrician", "electricals"],
    ["agree", "agreed", "agreement", "agreeing", "agreeable", "disagree"],
    ["study", "studies", "studied", "studying", "student", "students"],
    ["analyze", "analysis", "analyses", "analytical", "analogous", "analogy"],
    ["adjust", "adjustable", "adjustment", "adjusting", "adjusted"],
    ["control", "controlling", "controlled", "controller", "controls"],
]

COMMON = """the a an of to in on at for with by from and or but not is are was were be been
being have has had do does did will would can could should may might must this that these
those it its they them their we our you your he she his her model models system systems
token tokens expert experts router routing server servers cache caches layer layers attention
latent matrix matrices weight weights value values query queries key keys batch batches
request requests response responses quickly slowly brown fox jumps over lazy dog cat cats
report reports market markets price prices rose fell sharply government officials said
announced president minister city cities country countries people year years day days
week weeks company companies percent million billion new old large small first last
because however although therefore meanwhile according result results increase increased
decrease decreased growth economy economic policy policies water river rivers mountain
mountains weather storm storms rain heavy light power energy nuclear solar wind
""".split()

VOCAB = sorted(set(COMMON) | {w for fam in FAMILIES for w in fam})

PUNCT = [",", ".", ";", ":", "!", "?", " -", " --", "'s", "...", " (", ")", "\"", "/"]
NUMBERS = ["3.14", "1,000,000", "2024", "COVID-19", "42", "0.5%", "$1.2bn", "v2", "7B",
           "1st", "x86_64", "10:30", "4x", "H200"]
UNICODE_WORDS = ["naïve", "café", "Straße", "İstanbul", "résumé", "Zürich", "São Paulo",
                 "Ελλάδα", "Москва", "北京", "東京は日本の首都です", "한국어", "🙂", "😀 emoji",
                 "\u212a", "ﬁnance", "Ｆｕｌｌｗｉｄｔｈ", "ǅemal", "ÀÉÎÕÜ", "ﬀ", "ΣΑΣ",
                 "naïvely", "coöperate", "\u00a0", "\u2009", "\u3000"]


def random_word():
    r = rng.random()
    if r < 0.06:
        return rng.choice(NUMBERS)
    if r < 0.10:
        return rng.choice(UNICODE_WORDS)
    w = rng.choice(VOCAB)
    c = rng.random()
    if c < 0.08:
        w = w.upper()
    elif c < 0.2:
        w = w.capitalize()
    return w


def sentence(n):
    parts = []
    for _ in range(n):
        w = random_word()
        if rng.random() < 0.12:
            w += rng.choice(PUNCT)
        parts.append(w)
    sep = rng.choice([" ", " ", " ", "  ", "\t"])
    return sep.join(parts)


def variant(word):
    """A morphological sibling of word, if it belongs to a family."""
    low = word.lower()
    for fam in FAMILIES:
        if low in fam:
            return rng.choice(fam)
    return word


def perturb(text, strength):
    words = text.split(" ")
    out = []
    for w in words:
        r = rng.random()
        if r < strength * 0.3:
            continue  # delete
        if r < strength * 0.6:
            out.append(variant(w))
        elif r < strength * 0.8:
            out.append(random_word())
        else:
            out.append(w)
        if rng.random() < strength * 0.1:
            out.append(random_word())  # insert
    if len(out) > 2 and rng.random() < strength:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def multiline(n_sents):
    return [sentence(rng.randint(0, 14)) for _ in range(n_sents)]


def pairs():
    out = []
    # Hand-picked edge cases.
    fixed = [
        ("", ""),
        ("", "the cat sat on the mat"),
        ("the cat sat on the mat", ""),
        ("   ", "\n\n"),
        ("!!! ... ???", "the cat"),
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("The Cat SAT on the mat.", "the cat sat on the mat"),
        ("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"),
        ("running runs ran", "run runner running"),
        ("He generously donated.", "They were generous donors."),
        ("relational databases relate tables", "a relation between related tables"),
        ("dying skies flies", "die sky fly"),
        ("北京是中国的首都", "北京是中国的首都"),
        ("东京 Tokyo 2020", "Tokyo 2020 东京"),
        ("naïve café résumé", "naive cafe resume"),
        ("İstanbul is big", "istanbul is big"),
        ("5\u212a run", "5k run"),
        ("Straße", "strasse"),
        ("ﬁnance ﬀ", "finance ff"),
        ("emoji 🙂 ok", "emoji ok"),
        ("COVID-19 cases rose 3.14%", "covid 19 cases rose 3 14"),
        ("U.S.A. e-mail don't", "u s a e mail don t"),
        ("a\nb\nc", "a b c"),
        ("a b\nb c", "a b c"),
        ("first line\n\nsecond line\n", "second line\nfirst line"),
        ("one\r\ntwo\r\nthree", "one\ntwo\nthree"),
        ("same\nsame\nsame", "same same"),
        ("the the the the", "the"),
        ("the", "the the the the"),
        ("a b a b a b", "b a b a b a"),
        ("x", "x"),
        ("x y", "y x"),
        ("yyyy yyyyy syzygy", "yyyy syzygi"),
        ("\t\ttabs\tand\u00a0nbsp\u2009thin", "tabs and nbsp thin"),
        ("ΣΑΣ σας", "sas"),
        ("controlling controllers", "control controller"),
        ("hopefulness hopefully", "hope hopeful"),
        ("inning innings outing outings canning cannings", "inning outing canning"),
        ("proceed exceed succeed howe news", "proceeding exceeding succeeding news"),
    ]
    out.extend(fixed)
    # Identical random texts (all scores 1 unless empty).
    for _ in range(15):
        s = sentence(rng.randint(1, 25))
        out.append((s, s))
    # Random single-line pairs at varying overlap.
    for i in range(180):
        ref = sentence(rng.randint(0, 40))
        strength = [0.0, 0.1, 0.3, 0.6, 1.0][i % 5]
        pred = perturb(ref, strength) if rng.random() < 0.85 else sentence(rng.randint(0, 40))
        out.append((pred, ref))
    # Multi-line summaries for ROUGE-Lsum.
    for i in range(110):
        ref_sents = multiline(rng.randint(1, 7))
        pred_sents = [perturb(s, rng.choice([0.0, 0.2, 0.5, 0.9])) for s in ref_sents]
        if rng.random() < 0.5:
            rng.shuffle(pred_sents)
        if rng.random() < 0.3:
            pred_sents.append(sentence(rng.randint(1, 10)))
        if rng.random() < 0.2 and len(pred_sents) > 1:
            pred_sents.pop(rng.randrange(len(pred_sents)))
        if rng.random() < 0.2 and len(pred_sents) > 1:
            # merge two sentences into one line
            j = rng.randrange(len(pred_sents) - 1)
            pred_sents[j:j + 2] = [pred_sents[j] + " " + pred_sents[j + 1]]
        nl_pred = rng.choice(["\n", "\n", "\n\n", "\r\n", "\n \n"])
        nl_ref = rng.choice(["\n", "\n", "\n\n"])
        pred = nl_pred.join(pred_sents)
        ref = nl_ref.join(ref_sents)
        if rng.random() < 0.2:
            pred += "\n"
        out.append((pred, ref))
    # Long texts.
    for _ in range(12):
        ref = " ".join(sentence(rng.randint(5, 30)) + "." for _ in range(rng.randint(15, 60)))
        pred = perturb(ref, rng.choice([0.1, 0.4, 0.8]))
        if rng.random() < 0.5:
            ref = ref.replace(". ", ".\n")
            pred = pred.replace(". ", ".\n")
        out.append((pred, ref))
    return out


def score_all(pair_list):
    plain = rouge_scorer.RougeScorer(TYPES, use_stemmer=False)
    stemmed = rouge_scorer.RougeScorer(TYPES, use_stemmer=True)
    records = []
    for i, (pred, ref) in enumerate(pair_list):
        rec = {"id": i, "prediction": pred, "reference": ref}
        for name, scorer in (("plain", plain), ("stemmed", stemmed)):
            s = scorer.score(ref, pred)  # score(target, prediction)
            rec[name] = {t: [s[t].precision, s[t].recall, s[t].fmeasure] for t in TYPES}
        records.append(rec)
    return records


def means(records):
    out = {}
    for name in ("plain", "stemmed"):
        out[name] = {
            t: [sum(r[name][t][k] for r in records) / len(records) for k in range(3)]
            for t in TYPES
        }
    # For comparison only: rouge-score's own (randomised) aggregate.
    for name, stem in (("plain", False), ("stemmed", True)):
        np.random.seed(0)
        agg = scoring.BootstrapAggregator()
        scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stem)
        for r in records:
            agg.add_scores(scorer.score(r["reference"], r["prediction"]))
        res = agg.aggregate()
        out["bootstrap_mid_seed0_" + name] = {
            t: [res[t].mid.precision, res[t].mid.recall, res[t].mid.fmeasure] for t in TYPES
        }
    return out


def escape(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def word_list(records):
    words = set()
    for r in records:
        for text in (r["prediction"], r["reference"]):
            words.update(re.findall(r"[a-z0-9]+", text.lower()))
    topics = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    words.update(re.findall(r"[a-z]+", topics.lower()))
    words.update(re.findall(r"[a-z]+", inspect.getsource(nltk_porter).lower()))
    words.update(VOCAB)
    # Synthetic derivations that walk every suffix rule of every step.
    suffixes = ["s", "es", "ies", "sses", "ss", "ed", "ied", "eed", "ing", "y", "ly", "er",
                "ers", "ness", "ation", "ational", "tional", "ization", "izer", "ator",
                "alism", "iveness", "fulness", "ousness", "aliti", "iviti", "biliti",
                "alli", "bli", "abli", "entli", "eli", "ousli", "fulli", "logi", "enci",
                "anci", "icate", "ative", "alize", "iciti", "ical", "ful", "al", "ance",
                "ence", "ic", "able", "ible", "ant", "ement", "ment", "ent", "sion",
                "tion", "ion", "ou", "ism", "ate", "iti", "ous", "ive", "ize", "e", "ll",
                "at", "bl", "iz", "ating", "bling", "izing", "ated", "ably", "fully"]
    bases = sorted(w for w in words if 2 <= len(w) <= 9)
    sample = rng.sample(bases, min(350, len(bases)))
    for b in sample:
        for suf in rng.sample(suffixes, 6):
            words.add(b + suf)
    # Edge cases: y-runs, short words, digits, doubled consonants, the pool.
    words.update(["y", "yy", "yyy", "yyyy", "yyyyy", "yyyyyy", "yyyyyyyyyyyy", "ay", "ya",
                  "syzygy", "toy", "boy", "boys", "say", "says", "saying", "spy", "spied",
                  "spies", "dies", "died", "ties", "tied", "lies", "lied", "pies", "is",
                  "as", "us", "ss", "sss", "ssss", "ies", "ied", "eed", "ing", "ed",
                  "abc123ing", "1234", "2000s", "mp3s", "hopping", "tanned", "falling",
                  "hissing", "fizzed", "failing", "filing", "conflated", "troubled",
                  "sized", "feed", "bled", "sing", "controll", "roll", "rate", "cease",
                  "probate", "allowance", "geology", "theology", "archaeology",
                  "radically", "radicalli", "formaliti", "vileli", "analogousli"])
    words.update(fam_word for fam in FAMILIES for fam_word in fam)
    words = sorted(w for w in words if w and "\t" not in w)
    # A few mixed-case and non-ASCII words: NLTK lower-cases before stemming.
    words += ["Running", "GENEROUSLY", "Relational", "Skies", "naïvely", "cafés",
              "coöperating", "İİİ", "Δοκιμές"]
    return words


def main():
    pair_list = pairs()
    records = score_all(pair_list)
    with open(OUT / "rouge_expected.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta = {
        "n": len(records),
        "rouge_score_version": importlib.metadata.version("rouge-score"),
        "nltk_version": nltk.__version__,
        "mean": means(records),
    }
    with open(OUT / "rouge_expected_mean.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for name, key in (("predictions.txt", "prediction"), ("references.txt", "reference")):
        with open(OUT / name, "w", encoding="utf-8", newline="") as f:
            for r in records:
                f.write(escape(r[key]) + "\n")
    stemmer = nltk_porter.PorterStemmer()
    words = word_list(records)
    with open(OUT / "porter_stems.tsv", "w", encoding="utf-8", newline="") as f:
        for w in words:
            f.write(f"{w}\t{stemmer.stem(w)}\n")
    print(f"{len(records)} pairs, {len(words)} stemmer words -> {OUT}")


if __name__ == "__main__":
    main()
