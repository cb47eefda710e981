#!/usr/bin/env python3
"""Bag-of-words multinomial naive Bayes on a bundled classification dataset (standard library
only): trains on data/<name>/train.jsonl, prints the accuracy on test.jsonl next to the
majority class. A yardstick for how learnable a dataset's labels are from its words.

    python3 scripts/bow_baseline.py food-reviews
"""
import collections
import json
import math
import re
import sys
from pathlib import Path


def load(name, split):
    path = Path(__file__).resolve().parent.parent / 'data' / name / f'{split}.jsonl'
    return [json.loads(line) for line in path.open(encoding='utf-8')]


def words(text):
    return set(re.findall(r"[a-z']+|[!?]", text.lower()))


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else 'food-reviews'
    train, test = load(name, 'train'), load(name, 'test')
    labels = sorted({r['label'] for r in train})
    prior = collections.Counter(r['label'] for r in train)
    counts = {l: collections.Counter() for l in labels}
    for r in train:
        counts[r['label']].update(words(r['text']))
    vocab = set().union(*counts.values())
    total = {l: sum(counts[l].values()) for l in labels}

    def predict(text):
        ws = [w for w in words(text) if w in vocab]
        return max(labels, key=lambda l: math.log(prior[l]) + sum(math.log((counts[l][w] + 1) / (total[l] + len(vocab))) for w in ws))

    acc = sum(predict(r['text']) == r['label'] for r in test) / len(test)
    major = prior.most_common(1)[0][0]
    print(json.dumps({'dataset': name, 'naive_bayes_accuracy': round(acc, 4), 'majority_accuracy': round(sum(r['label'] == major for r in test) / len(test), 4)}))


if __name__ == '__main__':
    main()
