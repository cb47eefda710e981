#!/usr/bin/env python3
"""Logistic regression (numpy, full-batch gradient descent, standardised features, L2
1e-3) on the features written by scripts/feature_probe.mjs; prints test accuracy per
feature set next to the majority class."""
import sys
from pathlib import Path

import numpy as np


def load(d, split, C):
    y = np.fromfile(Path(d) / f'{split}.y', dtype=np.int32)
    X = np.fromfile(Path(d) / f'{split}.f32', dtype=np.float32).reshape(len(y), 3, C)
    return X, y


def fit(Xa, ya, Xb, yb, K, l2=1e-3, lr=0.1, iters=500):
    mu, sd = Xa.mean(0), Xa.std(0) + 1e-6
    Xa, Xb = (Xa - mu) / sd, (Xb - mu) / sd
    W, b, Y = np.zeros((Xa.shape[1], K)), np.zeros(K), np.eye(K)[ya]
    for _ in range(iters):
        Z = Xa @ W + b
        Z -= Z.max(1, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(1, keepdims=True)
        G = (P - Y) / len(ya)
        W -= lr * (Xa.T @ G + l2 * W)
        b -= lr * G.sum(0)
    return ((Xb @ W + b).argmax(1) == yb).mean()


def main():
    d, C = sys.argv[1], int(sys.argv[2])
    Xtr, ytr = load(d, 'train', C)
    Xte, yte = load(d, 'test', C)
    K = int(max(ytr.max(), yte.max())) + 1
    print(f'majority class          {100 * (yte == np.bincount(ytr).argmax()).mean():.1f}%')
    for i, name in enumerate(['mean final state', 'last final state', 'mean token embedding']):
        print(f'{name:<24}{100 * fit(Xtr[:, i], ytr, Xte[:, i], yte, K):.1f}%')


if __name__ == '__main__':
    main()
