"""The Recurrent Delta rule: the readable specification of `rec_delta_fn`."""
import torch


def rec_delta_reference(qx, kx, vx, bx, R_q, R_k, R_v, r_b, W0, h0):
    """qx, kx, vx: (B, H, L, D); bx: (B, H, L, 1); R_q, R_k, R_v: (1, H, D, D); r_b: (1, H, 1, D);
    W0: (B, H, D, D); h0: (B, H, 1, D). Returns (B, H, L, D).

    The previous output (its tanh) feeds back into the query, key, value and learning rate of the next step.
    """
    W = W0
    state = h0[:, :, 0]
    outs = []
    for t in range(qx.shape[2]):
        s = torch.tanh(state)
        q = torch.softmax(qx[:, :, t] + torch.einsum("bhd,hde->bhe", s, R_q[0]), dim=-1)
        k = torch.softmax(kx[:, :, t] + torch.einsum("bhd,hde->bhe", s, R_k[0]), dim=-1)
        v = vx[:, :, t] + torch.einsum("bhd,hde->bhe", s, R_v[0])
        beta = torch.sigmoid(bx[:, :, t] + (s * r_b[:, :, 0]).sum(-1, keepdim=True))
        v_old = torch.einsum("bhe,bhem->bhm", k, W)
        W = W + k[..., None] * (beta * (v - v_old))[:, :, None, :]
        state = torch.einsum("bhe,bhem->bhm", q, W)
        outs.append(state)
    return torch.stack(outs, dim=2)
