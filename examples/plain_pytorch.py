"""Path-SGD in a plain PyTorch loop (no Lightning): an MLP on scikit-learn's 8x8 digits.

    python examples/plain_pytorch.py

Trains the same network from the paper's balanced init and from an unbalanced rescaling of it
(same function, same path-norm) and shows that Path-SGD follows the same trajectory from both.
"""

import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

import pl_pathsgd as P


def main(epochs: int = 15) -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    train, test = order[:1500], order[1500:]

    balanced = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    P.balanced_init_(balanced, seed=0)
    unbalanced = P.unbalanced_init_(copy.deepcopy(balanced), seed=1)
    print(f"path-norm: balanced {P.path_norm(balanced):.4f}, unbalanced {P.path_norm(unbalanced):.4f}")

    for name, model in (("balanced", balanced), ("unbalanced", unbalanced)):
        optimizer = P.PathSGD(model.parameters(), lr=0.02, momentum=0.5, model=model)
        for epoch in range(epochs):
            for batch in train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))].split(100):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            train_error = (model(x[train]).argmax(1) != y[train]).float().mean()
            test_error = (model(x[test]).argmax(1) != y[test]).float().mean()
        print(f"{name:>10}: final loss {loss.item():.4f}, train error {train_error:.4f}, test error {test_error:.4f}")


if __name__ == "__main__":
    main()
