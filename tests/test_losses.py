"""Every divergence against a direct formula (values and gradients), and the chunked loss
against the naive one on whole logits."""

import math

import pytest
import torch

from compressor.losses import LossConfig, Workspace, divergence, kd_loss, kd_loss_naive, shift_labels


def _direct(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """p = teacher probs, q = student probs, written from the textbook definitions."""
    if kind == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_direct_formula_and_gradient(kind, temperature):
    torch.manual_seed(0)
    s = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 11, dtype=torch.float64)
    cfg = LossConfig(divergence=kind, temperature=temperature, beta=0.3)
    got = divergence(s, t, cfg)
    s2 = s.detach().clone().requires_grad_(True)
    want = _direct((t / temperature).softmax(-1), (s2 / temperature).softmax(-1), kind, beta=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_jsd_endpoints_are_the_two_kls_and_small_beta_approaches_forward_kl():
    torch.manual_seed(1)
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    fwd = divergence(s, t, LossConfig(divergence="forward_kl"))
    rev = divergence(s, t, LossConfig(divergence="reverse_kl"))
    torch.testing.assert_close(divergence(s, t, LossConfig(divergence="jsd", beta=0.0)), fwd)
    torch.testing.assert_close(divergence(s, t, LossConfig(divergence="jsd", beta=1.0)), rev)
    # JSD(beta)/beta -> KL(t||s) as beta -> 0 (the GKD limit); the ratio converges slowly
    near = divergence(s.double(), t.double(), LossConfig(divergence="jsd", beta=1e-4)) / 1e-4
    torch.testing.assert_close(near.float(), fwd, rtol=2e-2, atol=1e-3)
    assert not torch.allclose(near.float(), rev, rtol=1e-2)


def test_top_k_keeps_the_teacher_support():
    torch.manual_seed(2)
    s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    k = 5
    got = divergence(s, t, LossConfig(divergence="forward_kl", top_k=k))
    t_top, idx = t.topk(k, -1)
    p = t_top.softmax(-1)
    q_full = s.log_softmax(-1).gather(-1, idx)
    torch.testing.assert_close(got, (p * (p.log() - q_full)).sum(-1))
    # the other divergences renormalise both over the teacher's top-k
    got_rev = divergence(s, t, LossConfig(divergence="reverse_kl", top_k=k))
    q = s.gather(-1, idx).softmax(-1)
    torch.testing.assert_close(got_rev, (q * (q.log() - p.log())).sum(-1))
    # k = vocab is the untruncated loss
    torch.testing.assert_close(divergence(s, t, LossConfig(top_k=50)), divergence(s, t, LossConfig()))


def test_temperature_squared_scaling_and_alpha_mix():
    torch.manual_seed(3)
    s, t = torch.randn(1, 7, 13), torch.randn(1, 7, 13)
    labels = torch.randint(0, 13, (1, 7))
    T, alpha = 3.0, 0.4
    loss = kd_loss_naive(s, t, labels, LossConfig(temperature=T, alpha=alpha))
    kd = divergence(s[0], t[0], LossConfig(temperature=T)).mean() * T * T
    ce = torch.nn.functional.cross_entropy(s[0], labels[0])
    torch.testing.assert_close(loss, alpha * kd + (1 - alpha) * ce)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("temperature,alpha", [(2.0, 0.7), (1.0, 0.5), (1.5, 1.0), (1.0, 0.0)])
def test_chunked_equals_naive_value_and_gradients(kind, top_k, temperature, alpha):
    """The chunked loss differentiates in forward (closed form for forward KL and CE, autograd on
    the chunk's logits otherwise); it must match autograd through whole logits, head bias and an
    upstream gradient other than 1 included."""
    torch.manual_seed(4)
    B, L, H, V = 2, 9, 16, 40
    head_s, head_t = torch.nn.Linear(H, V), torch.nn.Linear(H, V, bias=False)
    hs = torch.randn(B, L, H, requires_grad=True)
    ht = torch.randn(B, L, H)
    labels = shift_labels(torch.randint(0, V, (B, L)))
    labels[0, 3] = -100  # an ignored position
    cfg = LossConfig(divergence=kind, temperature=temperature, alpha=alpha, top_k=top_k, chunk_tokens=5)

    chunked = kd_loss(hs, head_s, ht, head_t, labels, cfg)
    (3 * chunked).backward()
    grads = [x.grad.clone() for x in (hs, head_s.weight, head_s.bias)]
    hs.grad, head_s.weight.grad, head_s.bias.grad = None, None, None

    naive = kd_loss_naive(head_s(hs), head_t(ht).detach(), labels, cfg)
    (3 * naive).backward()
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (hs.grad, head_s.weight.grad, head_s.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_loss_in_bf16_returns_gradients_in_the_head_dtype():
    """Accumulated in fp32, the head's gradient comes back in its own dtype (autograd requires it)."""
    torch.manual_seed(5)
    head = torch.nn.Linear(16, 40, bias=True).to(torch.bfloat16)
    hs = torch.randn(2, 6, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = shift_labels(torch.randint(0, 40, (2, 6)))
    kd_loss(hs, head, hs.detach(), head, labels, LossConfig(temperature=2.0, alpha=0.5, chunk_tokens=4)).backward()
    assert hs.grad.dtype == head.weight.grad.dtype == head.bias.grad.dtype == torch.bfloat16
    assert torch.isfinite(head.weight.grad.float()).all() and head.weight.grad.abs().sum() > 0


def test_shift_labels_and_all_ignored():
    ids = torch.tensor([[5, 6, 7]])
    assert shift_labels(ids).tolist() == [[6, 7, -100]]
    h = torch.randn(1, 3, 4, requires_grad=True)
    head = torch.nn.Linear(4, 8)
    loss = kd_loss(h, head, h.detach(), head, torch.full((1, 3), -100), LossConfig())
    assert loss.item() == 0.0 and not math.isnan(loss.item())


def test_a_workspace_reused_across_steps_changes_nothing():
    """A training step hands the same buffers to every call: stale contents from a bigger call,
    another divergence or a chunk tail must not leak into the next loss or its gradients."""
    torch.manual_seed(6)
    H, V = 16, 40
    head_s, head_t = torch.nn.Linear(H, V), torch.nn.Linear(H, V, bias=False)
    ws = Workspace()
    calls = [
        (2, 9, LossConfig(temperature=2.0, alpha=0.7, chunk_tokens=5)),
        (1, 4, LossConfig(divergence="jsd", alpha=1.0, top_k=7, chunk_tokens=3)),
        (2, 6, LossConfig(temperature=1.0, alpha=1.0, chunk_tokens=4)),
        (3, 5, LossConfig(alpha=0.0, chunk_tokens=16)),
    ]
    for B, L, cfg in calls:
        hs = torch.randn(B, L, H, requires_grad=True)
        ht = torch.randn(B, L, H)
        labels = shift_labels(torch.randint(0, V, (B, L)))
        got = kd_loss(hs, head_s, ht, head_t, labels, cfg, ws)
        (g_got,) = torch.autograd.grad(got, hs)
        want = kd_loss(hs, head_s, ht, head_t, labels, cfg)  # a fresh workspace
        (g_want,) = torch.autograd.grad(want, hs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
