"""The FedProx local solver: the squared proximal term and its closed-form gradient."""

import torch
from torch import nn

from fleetfl.client.solver import fedprox_train, proximal_term


def _logreg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 3))


def test_proximal_gradient_matches_closed_form():
    """d/dw [mu/2 ||w - w_t||^2] = mu (w - w_t), the squared norm of the paper."""
    mu = 0.7
    w = torch.randn(4, 3, requires_grad=True)
    anchor = torch.randn(4, 3)
    (mu / 2 * proximal_term([w], [anchor])).backward()
    torch.testing.assert_close(w.grad, mu * (w.detach() - anchor))


def test_one_step_equals_sgd_on_loss_plus_prox():
    """After moving away from w_t, one SGD step on the FedProx loss adds -lr*mu*(w - w_t)."""
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    mu, lr = 2.0, 0.1
    anchor_model = _logreg()
    m_prox, m_plain = _logreg(), _logreg()
    # The anchor is the model on entry, so the prox gradient is zero at the first step;
    # take two steps and compare with a manual computation of both.
    res = fedprox_train(m_prox, x, y, mu=mu, lr=lr, batch_size=8, steps=2, seed=0)
    assert res.steps == 2 and res.samples == 16
    w_t = [p.detach().clone() for p in anchor_model.parameters()]
    params = list(m_plain.parameters())
    for _ in range(2):
        loss = nn.functional.cross_entropy(m_plain(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, a in zip(params, grads, w_t, strict=True):
                p -= lr * (g + mu * (p - a))
    for p, q in zip(m_prox.parameters(), m_plain.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_large_mu_keeps_the_model_near_the_anchor():
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    drift = {}
    for mu in (0.0, 10.0):
        model = _logreg()
        start = [p.detach().clone() for p in model.parameters()]
        fedprox_train(model, x, y, mu=mu, lr=0.05, batch_size=8, steps=40, seed=1)
        moved = zip(model.parameters(), start, strict=True)
        drift[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in moved)
    assert drift[10.0] < 0.5 * drift[0.0]


def test_partial_work_is_a_prefix_of_full_work():
    """A straggler doing k steps ends where the full run was after k steps (same seed).

    12 steps of batch 4 over 30 examples cross an epoch boundary (8 batches per epoch), so
    the prefix holds across the permutation redrawn for the second epoch too.
    """
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    k = 5
    short, long_ = _logreg(), _logreg()
    res_short = fedprox_train(short, x, y, mu=0.1, lr=0.1, batch_size=4, steps=k, seed=3)
    assert res_short.steps == k
    after: list[list[torch.Tensor]] = []  # long_'s parameters after each of its steps

    def snapshot() -> None:
        after.append([p.detach().clone() for p in long_.parameters()])

    res = fedprox_train(long_, x, y, mu=0.1, lr=0.1, batch_size=4, steps=12, seed=3,
                        post_step=snapshot)
    assert res.steps == 12 and len(after) == 12
    # Same batches, same anchor, same float operations: bit-for-bit the same parameters.
    for p, q in zip(short.parameters(), after[k - 1], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    # ... and not trivially: the run moved on after step k, and step k-1 was elsewhere.
    assert not torch.allclose(short[1].weight, long_[1].weight)
    assert not torch.allclose(short[1].weight, after[k - 2][0])
