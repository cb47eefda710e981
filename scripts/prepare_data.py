#!/usr/bin/env python3
"""Build the JSONL datasets under data/ from extracted Debian packages.

Normally run by scripts/prepare_data.sh, which downloads and extracts the
.deb files and exports the R data sets to CSV first.  Standard library only.

Inputs:
  --debroot DIR   directory holding one extracted tree per package
                  (DIR/<package>/usr/...)
  --rexport DIR   CSV files written by the R export step
                  (training_data.csv, testing_data.csv, austen_books.csv)
  --versions S    "pkg=version,pkg=version,..." (recorded in meta/README)
  --out DIR       output directory (the repository's data/)

Everything is deterministic: inputs are sorted before any seeded shuffle,
and the random generator is Python's random.Random with fixed seeds.
"""

from __future__ import annotations

import argparse
import collections
import csv
import html
import json
import os
import random
import re
import sys
import textwrap
import unicodedata

# --------------------------------------------------------------------------
# Parameters (changing any of these changes the output)
# --------------------------------------------------------------------------

SEED_FOOD = 1001
SEED_WORDNET = 2002
SEED_FORTUNES = 3003
SEED_AUSTEN = 4004

FOOD_VALIDATION = 500  # carved out of the source training set, stratified

WORDNET_MIN_SYNSETS = 100  # drop lexicographer files with fewer usable glosses
WORDNET_SIZES = {"train": 6000, "validation": 1000, "test": 1000}
WORDNET_FLOOR = {"train": 30, "validation": 5, "test": 5}  # per label

FORTUNE_MAX_CHARS = 1000  # longer fortunes are dropped
FORTUNE_MIN_RECORDS = 150  # smaller categories are dropped
FORTUNE_CAP = 300  # records kept per category (random subsample)
FORTUNE_FRAC = {"validation": 0.15, "test": 0.15}

AUSTEN_TARGET = 1200  # pack paragraphs up to this many characters
AUSTEN_MIN = 500  # ... but allow up to AUSTEN_MAX to avoid short passages
AUSTEN_MAX = 1500
AUSTEN_TRAIN_PASSAGES = 1100  # random subsample of the training passages

SPLITS = ("train", "validation", "test")

LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact",
    7: "noun.attribute", 8: "noun.body", 9: "noun.cognition",
    10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive",
    17: "noun.object", 18: "noun.person", 19: "noun.phenomenon",
    20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape",
    26: "noun.state", 27: "noun.substance", 28: "noun.time",
}

AUSTEN_BOOKS = [
    "Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
    "Northanger Abbey", "Persuasion",
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def norm_ws(text: str) -> str:
    """NFC-normalise and collapse every run of whitespace to one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def dedup(items, report, name="records"):
    """items: list of (text, label, extra).  Exact-text dedup.

    A text seen with more than one label is dropped entirely; otherwise the
    first occurrence (in the given order) is kept.
    """
    labels = collections.defaultdict(set)
    for text, label, _ in items:
        labels[text].add(label)
    conflicting = {t for t, ls in labels.items() if len(ls) > 1}
    seen = set()
    out = []
    n_dup = 0
    n_conf = 0
    for item in items:
        text = item[0]
        if text in conflicting:
            n_conf += 1
            continue
        if text in seen:
            n_dup += 1
            continue
        seen.add(text)
        out.append(item)
    report["dedup_removed_" + name] = n_dup
    report["conflict_removed_" + name] = n_conf
    report["conflict_texts_" + name] = len(conflicting)
    return out


def allocate(counts: dict, total: int, floor: int) -> dict:
    """Split `total` over keys: `floor` each, the rest proportionally to
    counts (largest-remainder rounding, ties broken by key)."""
    keys = sorted(counts)
    rest = total - floor * len(keys)
    if rest < 0:
        raise ValueError("floor too large")
    n = sum(counts[k] for k in keys)
    quota = {k: rest * counts[k] / n for k in keys}
    alloc = {k: floor + int(quota[k]) for k in keys}
    left = total - sum(alloc.values())
    order = sorted(keys, key=lambda k: (-(quota[k] - int(quota[k])), k))
    for k in order[:left]:
        alloc[k] += 1
    return alloc


def write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_dataset(out_dir, name, task, splits, source, license_, labels=None):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    for s in SPLITS:
        write_jsonl(os.path.join(d, s + ".jsonl"), splits[s])
    meta = {"name": name, "task": task}
    if task == "cls":
        meta["labels"] = sorted(labels)
    meta["counts"] = {s: len(splits[s]) for s in SPLITS}
    meta["source"] = source
    meta["license"] = license_
    with open(os.path.join(d, "meta.json"), "w", encoding="utf-8",
              newline="\n") as f:
        f.write(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")


def check_cls(splits):
    """Every split has the same label set; no text in two splits."""
    sets = {s: {r["label"] for r in splits[s]} for s in SPLITS}
    if not (sets["train"] == sets["validation"] == sets["test"]):
        raise SystemExit("label sets differ between splits: %r" % sets)
    check_disjoint(splits)
    return sorted(sets["train"])


def check_disjoint(splits):
    seen = {}
    for s in SPLITS:
        for r in splits[s]:
            if not r["text"]:
                raise SystemExit("empty text in %s" % s)
            if r["text"] in seen:
                raise SystemExit("text in %s and %s: %r"
                                 % (seen[r["text"]], s, r["text"][:80]))
            seen[r["text"]] = s


def label_counts(records):
    c = collections.Counter(r["label"] for r in records)
    return dict(sorted(c.items()))


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def stratified_shuffle(records, seed):
    """Sort (for stability) then shuffle with a fixed seed."""
    recs = sorted(records, key=lambda r: (r.get("label", ""), r["text"]))
    random.Random(seed).shuffle(recs)
    return recs


# --------------------------------------------------------------------------
# 1. food-reviews
# --------------------------------------------------------------------------

TAG_BR = re.compile(r"<br\s*/?>", re.I)
TAG_ANY = re.compile(r"</?[A-Za-z][^<>]{0,300}>")


def clean_review(text: str) -> str:
    text = TAG_BR.sub(" ", text)
    text = TAG_ANY.sub(" ", text)
    text = html.unescape(text)
    return norm_ws(text)


def build_food(rdir, report):
    src = {}
    for part, fname in (("train", "training_data.csv"),
                        ("test", "testing_data.csv")):
        rows = read_csv(os.path.join(rdir, fname))
        report["source_" + part] = len(rows)
        src[part] = [(clean_review(r["review"]), r["score"], part)
                     for r in rows]
    for part in src:
        for t, lab, _ in src[part]:
            if lab not in ("great", "other"):
                raise SystemExit("unexpected score %r" % lab)
    # Test first, so that a review present in both source splits stays in
    # test; then the source training rows.
    items = [x for x in src["test"] + src["train"] if x[0]]
    report["empty_removed"] = len(src["test"]) + len(src["train"]) - len(items)
    items = dedup(items, report)
    test = [{"text": t, "label": lab} for t, lab, p in items if p == "test"]
    train_all = [{"text": t, "label": lab}
                 for t, lab, p in items if p == "train"]
    report["removed_from_test"] = report["source_test"] - len(test)
    report["removed_from_train"] = report["source_train"] - len(train_all)

    rng = random.Random(SEED_FOOD)
    by_label = collections.defaultdict(list)
    for r in sorted(train_all, key=lambda r: (r["label"], r["text"])):
        by_label[r["label"]].append(r)
    alloc = allocate({k: len(v) for k, v in by_label.items()},
                     FOOD_VALIDATION, 0)
    train, val = [], []
    for lab in sorted(by_label):
        group = by_label[lab]
        rng.shuffle(group)
        val += group[:alloc[lab]]
        train += group[alloc[lab]:]
    splits = {
        "train": stratified_shuffle(train, SEED_FOOD + 1),
        "validation": stratified_shuffle(val, SEED_FOOD + 2),
        "test": stratified_shuffle(test, SEED_FOOD + 3),
    }
    return splits


# --------------------------------------------------------------------------
# 2. wordnet-supersense
# --------------------------------------------------------------------------

# An example sentence starts at ';', ':' or ',' followed by a double quote
# (but not inside "(e.g., "...")").
EXAMPLE_START = re.compile(r'[;:]\s*"|(?<!e\.g\.),\s*"')


def clean_gloss(gloss: str):
    """Return (definition, had_examples).

    WordNet glosses are 'definition; "example"; "example"'.  Everything from
    the first ';' (rarely ':' or ',') that is followed by a double quote is
    dropped.
    """
    g = gloss.strip()
    m = EXAMPLE_START.search(g)
    had = m is not None
    if m:
        g = g[:m.start()]
    elif g.startswith('"'):
        # a gloss that is only an example sentence: no definition
        return "", True
    g = norm_ws(g).rstrip(" ;:,")
    return g, had


def check_lexnames(debroot):
    """Cross-check LEXNAMES against the lexnames(5WN) man page if present."""
    import gzip
    path = os.path.join(debroot, "wordnet-base", "usr", "share", "man",
                        "man5", "lexnames.5WN.gz")
    if not os.path.exists(path):
        return
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        found = dict((int(m.group(1)), m.group(2)) for m in
                     re.finditer(r"^(\d\d)\t(noun\.\w+)", f.read(), re.M))
    if found != LEXNAMES:
        raise SystemExit("lexnames mismatch: %r" % found)


def build_wordnet(debroot, report):
    check_lexnames(debroot)
    path = os.path.join(debroot, "wordnet-base", "usr", "share", "wordnet",
                        "data.noun")
    items = []
    n_syn = n_ex = n_empty = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" ")
            lexnum = int(fields[1], 10)
            if fields[2] != "n":
                raise SystemExit("not a noun synset: %r" % line[:60])
            label = LEXNAMES[lexnum]
            if " | " not in line:
                n_empty += 1
                continue
            gloss = line.split(" | ", 1)[1]
            n_syn += 1
            text, had = clean_gloss(gloss)
            n_ex += had
            if not text:
                n_empty += 1
                continue
            items.append((text, label, fields[0]))
    report["synsets"] = n_syn
    report["glosses_with_examples_stripped"] = n_ex
    report["empty_removed"] = n_empty
    report["source_label_counts"] = dict(sorted(
        collections.Counter(lab for _, lab, _ in items).items()))
    items.sort(key=lambda x: x[2])  # by synset offset (file order)
    items = dedup(items, report)
    per_label = collections.Counter(lab for _, lab, _ in items)
    report["dedup_label_counts"] = dict(sorted(per_label.items()))
    dropped = sorted(lab for lab, n in per_label.items()
                     if n < WORDNET_MIN_SYNSETS)
    report["dropped_labels"] = {lab: per_label[lab] for lab in dropped}
    items = [x for x in items if x[1] not in dropped]
    report["usable"] = len(items)
    report["usable_label_counts"] = dict(sorted(
        collections.Counter(lab for _, lab, _ in items).items()))

    groups = collections.defaultdict(list)
    for text, lab, _ in items:
        groups[lab].append(text)
    counts = {lab: len(v) for lab, v in groups.items()}
    alloc = {s: allocate(counts, WORDNET_SIZES[s], WORDNET_FLOOR[s])
             for s in SPLITS}
    rng = random.Random(SEED_WORDNET)
    out = {s: [] for s in SPLITS}
    for lab in sorted(groups):
        texts = sorted(groups[lab])
        rng.shuffle(texts)
        pos = 0
        for s in ("test", "validation", "train"):
            k = alloc[s][lab]
            if pos + k > len(texts):
                raise SystemExit("not enough glosses for %s" % lab)
            out[s] += [{"text": t, "label": lab} for t in texts[pos:pos + k]]
            pos += k
    return {s: stratified_shuffle(out[s], SEED_WORDNET + 1 + i)
            for i, s in enumerate(SPLITS)}


# --------------------------------------------------------------------------
# 3. fortunes
# --------------------------------------------------------------------------

OVERSTRIKE = re.compile(r".\x08", re.S)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_fortune(text: str) -> str:
    prev = None
    while prev != text:  # "_\bX" (underline) and "X\bX" (bold) -> "X"
        prev = text
        text = OVERSTRIKE.sub("", text)
    text = CONTROL.sub("", text)
    return norm_ws(text)


def read_fortune_file(path):
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")  # all files in these packages are UTF-8
    records, cur = [], []
    for line in text.split("\n"):
        if line.rstrip("\r") == "%":
            records.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    records.append("\n".join(cur))
    return records


def fortune_files(debroot):
    """(category, package, path) for every fortune text file."""
    out = []
    for pkg in ("fortunes", "fortunes-min"):
        d = os.path.join(debroot, pkg, "usr", "share", "games", "fortunes")
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if name == "off" or name.startswith("."):
                continue  # offensive sub-directory (not shipped here)
            if os.path.islink(p) or not os.path.isfile(p):
                continue  # *.u8 symlinks, directories
            if name.endswith(".dat") or name.endswith(".u8"):
                continue  # strfile index files
            out.append((name, pkg, p))
    return out


def build_fortunes(debroot, report):
    files = fortune_files(debroot)
    cats = [c for c, _, _ in files]
    if len(cats) != len(set(cats)):
        raise SystemExit("category in both packages: %r" % cats)
    report["files"] = {c: pkg for c, pkg, _ in files}
    items = []
    raw_counts = {}
    n_long = collections.Counter()
    for cat, _, path in files:
        recs = [clean_fortune(r) for r in read_fortune_file(path)]
        recs = [r for r in recs if r]
        raw_counts[cat] = len(recs)
        for r in recs:
            if len(r) > FORTUNE_MAX_CHARS:
                n_long[cat] += 1
                continue
            items.append((r, cat, None))
    report["raw_counts"] = dict(sorted(raw_counts.items()))
    report["too_long_removed"] = sum(n_long.values())
    report["too_long_by_category"] = dict(sorted(n_long.items()))
    items.sort(key=lambda x: (x[1], x[0]))
    items = dedup(items, report)
    per_cat = collections.Counter(lab for _, lab, _ in items)
    report["clean_counts"] = dict(sorted(per_cat.items()))
    kept = sorted(c for c, n in per_cat.items() if n >= FORTUNE_MIN_RECORDS)
    report["kept"] = kept
    report["dropped"] = {c: per_cat.get(c, 0) for c in sorted(raw_counts)
                         if c not in kept}

    groups = collections.defaultdict(list)
    for text, lab, _ in items:
        if lab in kept:
            groups[lab].append(text)
    rng = random.Random(SEED_FORTUNES)
    out = {s: [] for s in SPLITS}
    capped = {}
    for lab in kept:
        texts = sorted(groups[lab])
        rng.shuffle(texts)
        if len(texts) > FORTUNE_CAP:
            capped[lab] = len(texts)
            texts = texts[:FORTUNE_CAP]
        n = len(texts)
        n_test = int(round(n * FORTUNE_FRAC["test"]))
        n_val = int(round(n * FORTUNE_FRAC["validation"]))
        out["test"] += [{"text": t, "label": lab} for t in texts[:n_test]]
        out["validation"] += [{"text": t, "label": lab}
                              for t in texts[n_test:n_test + n_val]]
        out["train"] += [{"text": t, "label": lab}
                         for t in texts[n_test + n_val:]]
    report["capped"] = capped
    return {s: stratified_shuffle(out[s], SEED_FORTUNES + 1 + i)
            for i, s in enumerate(SPLITS)}


# --------------------------------------------------------------------------
# 4. austen
# --------------------------------------------------------------------------

CHAPTER = re.compile(r"^chapter\s+([0-9]+|[ivxlc]+)\s*$", re.I)
SKIP_LINE = re.compile(
    r"^\s*(volume\s+[ivx]+|the end|finis|[*\s]+)\s*$", re.I)
END_MATTER = re.compile(r"^\s*a note on the text\s*$", re.I)
SENTENCE_END = re.compile(r'(?<=[.!?])["\'_)]*\s+')


def austen_chapters(rows):
    """{book: [chapter paragraphs, ...]} (chapters in order, headings and
    front/end matter removed)."""
    lines = collections.defaultdict(list)
    for r in rows:
        lines[r["book"]].append(r["text"])
    if sorted(lines) != sorted(AUSTEN_BOOKS):
        raise SystemExit("unexpected books: %r" % sorted(lines))
    books = {}
    for book in AUSTEN_BOOKS:
        chapters = []
        para = []
        cur = None  # None until the first chapter heading
        for line in lines[book] + [""]:
            if END_MATTER.match(line):
                break  # editorial note after the last chapter
            if CHAPTER.match(line.strip()):
                if para and cur is not None:
                    cur.append(norm_ws(" ".join(para)))
                para = []
                cur = []
                chapters.append(cur)
                continue
            if cur is None:
                continue  # title page, author's advertisement, etc.
            if line.strip() and SKIP_LINE.match(line):
                continue
            if line.strip() == "":
                if para:
                    cur.append(norm_ws(" ".join(para)))
                    para = []
            else:
                para.append(line)
        if para and cur is not None:
            cur.append(norm_ws(" ".join(para)))
        books[book] = [[p for p in ch if p] for ch in chapters]
    return books


def split_long(par: str, limit: int):
    """Split a paragraph longer than `limit` at sentence ends (then at
    spaces if a single sentence is still too long)."""
    if len(par) <= limit:
        return [par]
    # Cut after . ! ? (plus any closing quotes/brackets/underscores).
    pieces = []
    pos = 0
    for m in SENTENCE_END.finditer(par):
        pieces.append(par[pos:m.start()] + par[m.start():m.end()].strip())
        pos = m.end()
    pieces.append(par[pos:])
    sentences = [p for p in (x.strip() for x in pieces) if p]
    out, cur = [], ""
    for s in sentences:
        while len(s) > limit:  # pathological: hard split at a space
            cut = s.rfind(" ", 0, limit)
            cut = cut if cut > 0 else limit
            if cur:
                out.append(cur)
                cur = ""
            out.append(s[:cut].strip())
            s = s[cut:].strip()
        if cur and len(cur) + 1 + len(s) > limit:
            out.append(cur)
            cur = s
        else:
            cur = s if not cur else cur + " " + s
    if cur:
        out.append(cur)
    return out


def pack_chapter(paragraphs):
    """Greedy packing of a chapter's paragraphs into passages.  Paragraphs
    are separated by a blank line; the pieces of a paragraph that had to be
    cut (split_long) are re-joined with a space when they share a passage."""
    units = []  # (text, separator placed before it inside a passage)
    for p in paragraphs:
        for k, piece in enumerate(split_long(p, AUSTEN_TARGET)):
            units.append((piece, " " if k else "\n\n"))

    def join(parts):
        return "".join((sep if i else "") + t
                       for i, (t, sep) in enumerate(parts))

    out, cur = [], []
    for u in units:
        if cur:
            n_new = len(join(cur + [u]))
            if n_new > AUSTEN_TARGET and not (
                    len(join(cur)) < AUSTEN_MIN and n_new <= AUSTEN_MAX):
                out.append(cur)
                cur = []
        cur.append(u)
    if cur:
        if out and len(join(cur)) < AUSTEN_MIN and \
                len(join(out[-1] + cur)) <= AUSTEN_MAX:
            out[-1] = out[-1] + cur
        else:
            out.append(cur)
    return [join(x) for x in out]


def austen_split(chapter_no: int) -> str:
    """Every 10th chapter of each book is held out, alternating between
    validation (10, 30, 50, ...) and test (20, 40, 60, ...)."""
    if chapter_no % 10 != 0:
        return "train"
    return "validation" if (chapter_no // 10) % 2 == 1 else "test"


def build_austen(rdir, report):
    rows = read_csv(os.path.join(rdir, "austen_books.csv"))
    report["source_lines"] = len(rows)
    books = austen_chapters(rows)
    report["chapters"] = {b: len(books[b]) for b in AUSTEN_BOOKS}
    held = {"validation": [], "test": []}
    items = []
    for book in AUSTEN_BOOKS:
        for i, ch in enumerate(books[book], start=1):
            s = austen_split(i)
            if s != "train":
                held[s].append("%s %d" % (book, i))
            for k, p in enumerate(pack_chapter(ch)):
                items.append((p, s, (AUSTEN_BOOKS.index(book), i, k)))
    report["held_out_chapters"] = held
    # items are in reading order; a duplicate keeps its first occurrence.
    # The 'label' slot holds the split, so a passage repeated in two
    # different splits is dropped from both.
    items = dedup(items, report)
    splits = {s: [{"text": t} for t, sp, _ in items if sp == s]
              for s in SPLITS}
    report["train_passages_before_subsample"] = len(splits["train"])
    report["train_chars_before_subsample"] = sum(
        len(r["text"]) for r in splits["train"])
    lens = [len(t) for t, _, _ in items]
    report["passage_chars"] = {"min": min(lens), "max": max(lens),
                               "mean": round(sum(lens) / len(lens))}
    for i, s in enumerate(SPLITS):
        recs = sorted(splits[s], key=lambda r: r["text"])
        random.Random(SEED_AUSTEN + i).shuffle(recs)
        if s == "train":
            recs = recs[:AUSTEN_TRAIN_PASSAGES]
        splits[s] = recs
    return splits


# --------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------

def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(out)


def cls_tables(splits):
    labels = sorted({r["label"] for r in splits["train"]})
    counts = {s: label_counts(splits[s]) for s in SPLITS}
    rows = [[("`%s`" % lab)] + [counts[s].get(lab, 0) for s in SPLITS]
            for lab in labels]
    rows.append(["**total**"] + [len(splits[s]) for s in SPLITS])
    table = md_table(["label"] + list(SPLITS), rows)
    # Majority class is taken from the training split; accuracy on test.
    tr = counts["train"]
    maj = sorted(tr, key=lambda k: (-tr[k], k))[0]
    acc = counts["test"].get(maj, 0) / len(splits["test"])
    return table, maj, acc


def baseline(maj, acc, splits):
    tr = label_counts(splits["train"])
    ties = sum(1 for k in tr if tr[k] == tr[maj]) - 1
    note = "`%s`" % maj
    if ties:
        note += (", first alphabetically of the %d labels sharing the "
                 "largest training count" % (ties + 1))
    return "%.4f test accuracy (always predicting %s)" % (acc, note)


def chars(splits):
    return {s: sum(len(r["text"]) for r in splits[s]) for s in SPLITS}


def write_readme(out_dir, versions, data, reports, debroot):
    v = versions
    food, wn, fo, au = (data[k] for k in
                        ("food-reviews", "wordnet-supersense", "fortunes",
                         "austen"))
    rf, rw, rfo, ra = (reports[k] for k in
                       ("food-reviews", "wordnet-supersense", "fortunes",
                        "austen"))
    t_food, maj_food, acc_food = cls_tables(food)
    t_wn, maj_wn, acc_wn = cls_tables(wn)
    t_wn_labels = sorted({r["label"] for r in wn["train"]})
    t_fo, maj_fo, acc_fo = cls_tables(fo)

    def sizes(splits):
        return ", ".join("%s %d" % (s, len(splits[s])) for s in SPLITS)

    fo_rows = []
    for c in sorted(rfo["raw_counts"]):
        if c in rfo["kept"]:
            status = "kept"
            if c in rfo["capped"]:
                status += " (subsampled %d -> %d)" % (rfo["capped"][c],
                                                       FORTUNE_CAP)
        else:
            status = "dropped: fewer than %d records" % FORTUNE_MIN_RECORDS
        fo_rows.append(["`%s`" % c, "`%s`" % rfo["files"][c],
                        rfo["raw_counts"][c], rfo["clean_counts"].get(c, 0),
                        status])
    fo_table = md_table(["category", "package", "records",
                         "after length filter + dedup", "status"], fo_rows)

    wn_src = md_table(
        ["label", "synsets", "after dedup", "status"],
        [["`%s`" % k, n, rw["dedup_label_counts"].get(k, 0),
          "dropped" if k in rw["dropped_labels"] else "kept"]
         for k, n in rw["source_label_counts"].items()])

    au_chars = chars(au)
    held = ra["held_out_chapters"]

    text = f"""# Datasets

Four small datasets for fine-tuning experiments, built from Debian packages
(Debian 12 "bookworm") by

```
bash scripts/prepare_data.sh
```

The script downloads the `.deb` files with `apt-get download`, unpacks them
with `dpkg -x` into a temporary directory, exports the two R data sets to CSV
with `Rscript` (with `R_LIBS` pointing into the unpacked tree; nothing is
installed system-wide) and then runs `scripts/prepare_data.py` (Python
standard library only), which writes everything under `data/` except
`data/sample/`. The package versions are pinned in the script; a rerun
produces byte-identical files (fixed seeds, sorted inputs).

Packages used:

{md_table(["package", "version"], [["`%s`" % k, "`%s`" % v[k]] for k in sorted(v)])}

## Common format and processing

* `data/<name>/{{train,validation,test}}.jsonl`: UTF-8, one JSON object per
  line, keys exactly `"text"` and `"label"` (classification) or only `"text"`
  (language modelling).
* `data/<name>/meta.json`: `name`, `task` (`cls` or `lm`), sorted `labels`
  (cls only), `counts` per split, `source`, `license`.
* Text is Unicode-NFC-normalised and every run of whitespace (including
  newlines and tabs) is collapsed to a single space, with leading/trailing
  space removed. The only exception is `austen`, where the paragraphs inside
  a passage are separated by a blank line (`"\\n\\n"`).
* Exact duplicate texts are removed before splitting, so a text occurs in
  only one split. If the same text occurs with different labels, all its
  copies are dropped.
* Every split of a classification dataset has the same label set.
* Each split is shuffled with a fixed seed (after a stable sort).
* "Majority baseline" is the test accuracy of always predicting the most
  frequent training label.

## 1. `food-reviews` (binary classification)

* **Source**: `r-cran-modeldata` {v["r-cran-modeldata"]}, R package
  [modeldata](https://cran.r-project.org/package=modeldata), data set
  `small_fine_foods` (objects `training_data`, `testing_data`), a sample of
  the Amazon Fine Food Reviews corpus (McAuley and Leskovec, 2013,
  <https://snap.stanford.edu/data/web-FineFoods.html>). `score` is `great`
  for a 5-star review and `other` otherwise.
* **Licence**: the modeldata package is MIT-licensed (Max Kuhn, RStudio);
  the review texts are Amazon user reviews as published by Stanford SNAP.
* **Processing**: `review` -> `text`, `score` -> `label` (unchanged:
  `great`/`other`). HTML line breaks (`<br />`) and other HTML tags are
  replaced by a space, HTML entities are decoded (`&quot;` -> `"`), then
  whitespace is normalised. Source test rows: {rf["source_test"]}, source
  training rows: {rf["source_train"]}. Exact duplicates removed:
  {rf["dedup_removed_records"]}; texts with conflicting labels:
  {rf["conflict_texts_records"]} ({rf["conflict_removed_records"]} rows
  dropped); a review found in both source splits is kept in test only.
  In all, {rf["removed_from_test"]} rows were removed from the source test
  set and {rf["removed_from_train"]} from the source training set. The source test set is kept as `test`; `validation` is a
  label-stratified random sample of {FOOD_VALIDATION} reviews from the source
  training set, the rest is `train`. No subsampling.
* **Sizes**: {sizes(food)}.
* **Majority baseline**: {baseline(maj_food, acc_food, food)}.

{t_food}

## 2. `wordnet-supersense` ({len(t_wn_labels)}-way classification)

* **Source**: `wordnet-base` {v["wordnet-base"]} (Princeton WordNet 3.0,
  <https://wordnet.princeton.edu/>), file `/usr/share/wordnet/data.noun`.
* **Licence**: WordNet 3.0 licence (permissive, BSD-like; "WordNet 3.0
  Copyright 2006 by Princeton University. All rights reserved."; the licence
  text must accompany copies, see `/usr/share/doc/wordnet-base/copyright`).
* **Task**: the gloss (definition) of a noun synset -> its lexicographer
  file ("supersense"), e.g. `noun.artifact`, `noun.person`.
* **Processing**: for each of the {rw["synsets"]} noun synsets, the label is
  the lexicographer file named by the 2nd field `lex_filenum` (03..28, names
  from lexnames(5WN)); the text is the gloss after ` | `. WordNet glosses
  have the form `definition; "example"; "example"`: everything from the first
  `;` (in a few glosses `:` or `,`, but not `(e.g., "`) followed by a double
  quote was cut off, so the text is the
  definition only ({rw["glosses_with_examples_stripped"]} glosses had
  examples removed), and trailing `;:,` are stripped. Glosses left empty:
  {rw["empty_removed"]}. Exact duplicate definitions removed:
  {rw["dedup_removed_records"]}; definitions shared by synsets with
  different labels: {rw["conflict_texts_records"]}
  ({rw["conflict_removed_records"]} glosses dropped).
  Labels with fewer than {WORDNET_MIN_SYNSETS} usable glosses were dropped
  because they could not be represented in every split:
  {", ".join("`%s` (%d)" % kv for kv in rw["dropped_labels"].items())}.
* **Subsampling**: from the remaining {rw["usable"]} glosses, a stratified
  sample of {WORDNET_SIZES["train"]} / {WORDNET_SIZES["validation"]} /
  {WORDNET_SIZES["test"]} (train / validation / test) was drawn: each label
  gets at least {WORDNET_FLOOR["train"]} / {WORDNET_FLOOR["validation"]} /
  {WORDNET_FLOOR["test"]} examples and the rest of each split is allocated in
  proportion to the label's share of the usable glosses (largest-remainder
  rounding), sampled without replacement with seed {SEED_WORDNET}.
* **Sizes**: {sizes(wn)}.
* **Majority baseline**: {baseline(maj_wn, acc_wn, wn)}.

{t_wn}

Glosses per label before subsampling (synsets with a non-empty definition,
then after removing duplicate and conflicting definitions):

{wn_src}

## 3. `fortunes` (classification of fortune-cookie texts by category)

* **Source**: `fortunes` {v["fortunes"]} and `fortunes-min`
  {v["fortunes-min"]} (the fortune-mod 1.99.1 database,
  <http://www.redellipse.net/code/downloads/fortune-mod-1.99.1.tar.gz>),
  files under `/usr/share/games/fortunes/`. The category is the file name.
* **Licence**: BSD licence (fortune-mod, University of California; see
  `/usr/share/doc/fortunes-min/copyright`). The quotations themselves are
  short quotes collected from many sources.
* **Processing**: records are separated by lines containing only `%`.
  Ignored: the `.dat` strfile indexes, the `.u8` symlinks and any other
  symlinks, and the `off/` directory of offensive fortunes (these packages
  do not ship one; offensive fortunes are in the separate `fortunes-off`
  package, which is not used). Terminal overstrike sequences (`_\\bX`,
  `X\\bX`) are reduced to the plain character and other control characters
  removed; then whitespace is normalised (this flattens the line layout of
  poems and attributions to single spaces). Empty records are dropped.
  Fortunes longer than {FORTUNE_MAX_CHARS} characters after normalisation
  were dropped: {rfo["too_long_removed"]} in total
  ({", ".join("%s %d" % kv for kv in rfo["too_long_by_category"].items())}).
  Exact duplicates removed: {rfo["dedup_removed_records"]}; texts found in
  more than one category: {rfo["conflict_texts_records"]}
  ({rfo["conflict_removed_records"]} records dropped).
* **Categories**: categories with fewer than {FORTUNE_MIN_RECORDS} records
  after the length filter and dedup were dropped (too few to split).
  None of the categories in these two packages is offensive-only (the
  upstream offensive set lives in `fortunes-off`), so none was dropped on
  that ground. To keep the data small and the classes less unbalanced, each
  kept category was randomly subsampled to at most {FORTUNE_CAP} records
  (seed {SEED_FORTUNES}). Each category is then split
  {int(100 * (1 - FORTUNE_FRAC["validation"] - FORTUNE_FRAC["test"]))} /
  {int(100 * FORTUNE_FRAC["validation"])} / {int(100 * FORTUNE_FRAC["test"])}
  % into train / validation / test (rounded per category).

{fo_table}

* **Sizes**: {sizes(fo)}.
* **Majority baseline**: {baseline(maj_fo, acc_fo, fo)}.

{t_fo}

## 4. `austen` (causal language modelling)

* **Source**: `r-cran-janeaustenr` {v["r-cran-janeaustenr"]}, R package
  [janeaustenr](https://cran.r-project.org/package=janeaustenr), function
  `austen_books()` (the six completed novels, from Project Gutenberg, one
  row per printed line with a `book` column).
* **Licence**: the novels are in the public domain; the janeaustenr package
  is MIT-licensed (Julia Silge).
* **Processing**: for each book, text before the first chapter heading
  (title page, Northanger Abbey's "Advertisement by the authoress") and the
  editorial "A NOTE ON THE TEXT" at the end of Northanger Abbey are dropped,
  as are chapter headings, `VOLUME ...` lines, `THE END`/`FINIS` and lines
  consisting only of asterisks. Consecutive non-empty lines are joined into
  paragraphs (whitespace normalised). Within each chapter, paragraphs are
  packed greedily into passages of up to {AUSTEN_TARGET} characters
  (joined by a blank line); a passage may grow to {AUSTEN_MAX} characters
  when it would otherwise stay under {AUSTEN_MIN}, and a short final passage
  of a chapter is merged into the previous one when the result stays within
  {AUSTEN_MAX}. Paragraphs longer than {AUSTEN_TARGET} characters are first
  cut at sentence ends (pieces that land in the same passage are re-joined
  with a space, so blank lines only mark real paragraph breaks). Passages
  never cross chapter boundaries.
  Passage length: min {ra["passage_chars"]["min"]}, mean
  {ra["passage_chars"]["mean"]}, max {ra["passage_chars"]["max"]}
  characters (short ones are the rare chapter-final remainders or very
  short chapters). Exact duplicate passages removed:
  {ra["dedup_removed_records"] + ra["conflict_removed_records"]}.
* **Split (by chapter)**: chapters are numbered 1, 2, ... within each book
  (Emma's per-volume numbering is made continuous). Chapters 10, 30, 50, ...
  of every book are `validation`, chapters 20, 40, 60, ... are `test`, all
  others are `train`, so no passage crosses splits.
  Validation chapters: {", ".join(held["validation"])}.
  Test chapters: {", ".join(held["test"])}.
* **Subsampling**: the training chapters give
  {ra["train_passages_before_subsample"]} passages
  ({ra["train_chars_before_subsample"]} characters); to keep `data/` small,
  a random sample of {AUSTEN_TRAIN_PASSAGES} of them (seed {SEED_AUSTEN}) is
  kept. Validation and test are complete.
* **Sizes**: {sizes(au)} passages; characters: train {au_chars["train"]},
  validation {au_chars["validation"]}, test {au_chars["test"]}.
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8",
              newline="\n") as f:
        f.write(reflow(text))
        f.write(licence_notices(debroot))


def _dep5_paragraph(text: str, start: str) -> str:
    """The indented body following a line `start` in a DEP-5 copyright
    file, with the leading space and ' .' blank-line markers removed."""
    lines = text.split("\n")
    # the last occurrence: the stand-alone licence paragraph
    i = len(lines) - 1 - lines[::-1].index(start)
    body = []
    for line in lines[i + 1:]:
        if not line.startswith(" "):
            break
        body.append("" if line.strip() == "." else line[1:])
    return "\n".join(body).rstrip()


def licence_notices(debroot: str) -> str:
    """Licence texts copied verbatim from the packages' copyright files."""
    def read(pkg):
        with open(os.path.join(debroot, pkg, "usr", "share", "doc", pkg,
                               "copyright"), encoding="utf-8") as f:
            return f.read()

    wn = read("wordnet-base")
    wn_text = _dep5_paragraph(wn, "License: WordNet3.0")
    fo = read("fortunes-min")
    a = fo.index("Copyright (c) 1991 The Regents")
    b = fo.index("SUCH DAMAGE.", a) + len("SUCH DAMAGE.")
    fo_text = fo[a:b]
    parts = ["## Licence notices\n",
             "Copied from the packages' `/usr/share/doc/<package>/copyright`"
             " files.\n",
             "### WordNet 3.0 (`wordnet-supersense`)\n",
             "```\n" + wn_text + "\n```\n",
             "### fortune-mod (`fortunes`)\n",
             "```\n" + fo_text + "\n```\n"]
    for pkg, ds in (("r-cran-modeldata", "food-reviews"),
                    ("r-cran-janeaustenr", "austen")):
        c = read(pkg)
        m = re.search(r"^Files: \*\nCopyright: (.*)\nLicense: MIT$", c, re.M)
        if not m:
            raise SystemExit("unexpected copyright file for " + pkg)
        mit = _dep5_paragraph(c, "License: MIT")
        if "Permission is hereby granted" not in mit:
            raise SystemExit("MIT licence text not found for " + pkg)
        parts.append("### %s (`%s`)\n" % (pkg, ds))
        parts.append("```\nCopyright: %s\n\n%s\n```\n" % (m.group(1), mit))
    return "\n" + "\n".join(parts)


def reflow(md: str, width: int = 78) -> str:
    """Re-wrap bullet items and plain paragraphs (not tables, headings or
    code blocks)."""
    out = []
    for block in md.strip("\n").split("\n\n"):
        if block.startswith(("* ", )):
            items = []
            for line in block.split("\n"):
                if line.startswith("* "):
                    items.append(line[2:].strip())
                else:
                    items[-1] += " " + line.strip()
            out.append("\n".join(
                textwrap.fill(it, width, initial_indent="* ",
                              subsequent_indent="  ",
                              break_long_words=False,
                              break_on_hyphens=False) for it in items))
        elif block[:1].isalpha():
            out.append(textwrap.fill(" ".join(block.split("\n")), width,
                                     break_long_words=False,
                                     break_on_hyphens=False))
        else:
            out.append(block)
    return "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--debroot", required=True)
    ap.add_argument("--rexport", required=True)
    ap.add_argument("--versions", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    versions = dict(kv.split("=", 1) for kv in args.versions.split(","))

    reports = {k: {} for k in ("food-reviews", "wordnet-supersense",
                               "fortunes", "austen")}
    data = {
        "food-reviews": build_food(args.rexport, reports["food-reviews"]),
        "wordnet-supersense": build_wordnet(args.debroot,
                                            reports["wordnet-supersense"]),
        "fortunes": build_fortunes(args.debroot, reports["fortunes"]),
        "austen": build_austen(args.rexport, reports["austen"]),
    }
    meta = {
        "food-reviews": (
            "Debian r-cran-modeldata %s: R package modeldata, data set "
            "small_fine_foods (Amazon Fine Food Reviews sample, "
            "https://snap.stanford.edu/data/web-FineFoods.html)"
            % versions["r-cran-modeldata"],
            "MIT (modeldata package); review texts from Amazon users as "
            "published by Stanford SNAP"),
        "wordnet-supersense": (
            "Debian wordnet-base %s: Princeton WordNet 3.0 data.noun "
            "(noun glosses -> lexicographer file)" % versions["wordnet-base"],
            "WordNet 3.0 license (Princeton University, BSD-like)"),
        "fortunes": (
            "Debian fortunes %s and fortunes-min %s: fortune-mod 1.99.1 "
            "database, /usr/share/games/fortunes (text -> file name)"
            % (versions["fortunes"], versions["fortunes-min"]),
            "BSD (fortune-mod, University of California)"),
        "austen": (
            "Debian r-cran-janeaustenr %s: R package janeaustenr, "
            "austen_books() (Project Gutenberg texts of the six novels)"
            % versions["r-cran-janeaustenr"],
            "Public domain texts; janeaustenr package MIT"),
    }
    for name, splits in data.items():
        if name == "austen":
            check_disjoint(splits)
            write_dataset(args.out, name, "lm", splits, *meta[name])
        else:
            labels = check_cls(splits)
            write_dataset(args.out, name, "cls", splits, *meta[name],
                          labels=labels)
    write_readme(args.out, versions, data, reports, args.debroot)

    for name, splits in data.items():
        line = "%-19s " % name + " ".join(
            "%s=%d" % (s, len(splits[s])) for s in SPLITS)
        if name != "austen":
            _, maj, acc = cls_tables(splits)
            line += "  labels=%d majority(%s)=%.4f" % (
                len({r["label"] for r in splits["train"]}), maj, acc)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
