"""The recurrent extensions as users write them today: a Python loop over time steps of torch ops.

It is the `extensions` set's baseline and, written from the options' definitions alone, the tests' independent
statement of their math (`seqfast.kernels.reference` is the other).
"""

import torch
import torch.nn.functional as F

import seqfast
from seqfast.functional import bernoulli_mask

EPS = 1e-5


def _step(mode, x_t, h, c, p, ln):
    """One step of torch.nn's cell `mode` with optional LayerNorm: `x_t [B, I]`, `h [B, H]`, `c [B, H]` (LSTM) ->
    `(h', c')`. `p`: `(w_ih, w_hh, b_ih, b_hh)` (biases may be None); `ln`: `(ln_ih, ln_hh, ln_c_w, ln_c_b)` or None."""
    w_ih, w_hh, b_ih, b_hh = p
    gi, gh = F.linear(x_t, w_ih), F.linear(h, w_hh)
    if ln is not None:
        gi = F.layer_norm(gi, gi.shape[1:], ln[0], None, EPS)
        gh = F.layer_norm(gh, gh.shape[1:], ln[1], None, EPS)
    if b_ih is not None:
        gi, gh = gi + b_ih, gh + b_hh
    if mode in ("RNN_TANH", "RNN_RELU"):
        a = gi + gh
        return (torch.tanh(a) if mode == "RNN_TANH" else torch.relu(a)), None
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c_new if ln is None else F.layer_norm(c_new, c_new.shape[1:], ln[2], ln[3], EPS)
        return torch.sigmoid(o) * torch.tanh(c_out), c_new
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h, None


def cell_loop(module, x, hx=None, resets=None):
    """Run `module` (a `seqfast.RNN`, `LSTM` or `GRU`, its `layer_norm` and `zoneout` read from it) one step at a
    time, as `module(x, hx, resets=resets)` would: the same results, and the same random draws in the same order (per
    layer, per direction: zoneout's `h` mask `[T, B, H]`, then LSTM's `c` mask; then dropout between layers).

    Args:
        x: `[T, B, I]` (`[B, T, I]` when `batch_first`); hx: as the module takes it, or None (default: zeros);
        resets: bool `[T, B]` (`[B, T]` when `batch_first`) or None (default).

    Returns:
        `(output, h_n)`, or `(output, (h_n, c_n))` for LSTM.
    """
    if module.proj_size or (module.weight_drop and module.training):
        raise ValueError("cell_loop runs neither proj_size nor weight_drop")
    mode, lstm = module.mode, module.mode == "LSTM"
    if module.batch_first:
        x = x.transpose(0, 1)
        resets = None if resets is None else resets.transpose(0, 1)
    T, B, _ = x.shape
    D, H = 2 if module.bidirectional else 1, module.hidden_size
    if hx is None:
        hx = x.new_zeros(module.num_layers * D, B, H)
        hx = (hx, hx) if lstm else hx
    h0s, c0s = (hx[0], hx[1]) if lstm else (hx, None)
    params = dict(module.named_parameters())
    hn, cn = [], []
    for layer in range(module.num_layers):
        outputs = []
        for d in range(D):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])
            p = [params[n + suffix] for n in names] + [None] * (0 if module.bias else 2)
            ln = None
            if module.layer_norm:
                ln_names = ["ln_ih_weight", "ln_hh_weight"] + (["ln_c_weight", "ln_c_bias"] if lstm else [])
                ln = [params[n + suffix] for n in ln_names] + [None] * (0 if lstm else 2)
            keep_h = keep_c = module.zoneout
            if module.zoneout and module.training:
                keep_h = bernoulli_mask(x, (T, B, H), module.zoneout)
                keep_c = bernoulli_mask(x, (T, B, H), module.zoneout) if lstm else None
            k = layer * D + d
            h, c = h0s[k], (c0s[k] if lstm else None)
            ys = [None] * T
            for t in reversed(range(T)) if d else range(T):
                boundary = None if resets is None else (resets[t] if not d else (resets[t + 1] if t + 1 < T else None))
                if boundary is not None:
                    h = torch.where(boundary[:, None], 0, h)
                    c = None if c is None else torch.where(boundary[:, None], 0, c)
                h_new, c_new = _step(mode, x[t], h, c, p, ln)
                if module.zoneout:
                    m_h = keep_h[t] if torch.is_tensor(keep_h) else keep_h
                    h_new = m_h * h + (1 - m_h) * h_new
                    if lstm:
                        m_c = keep_c[t] if torch.is_tensor(keep_c) else keep_c
                        c_new = m_c * c + (1 - m_c) * c_new
                h, c, ys[t] = h_new, c_new, h_new
            outputs.append(torch.stack(ys))
            hn.append(h)
            cn.append(c)
        x = torch.cat(outputs, 2)
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, training=True)
    y = x.transpose(0, 1) if module.batch_first else x
    return (y, (torch.stack(hn), torch.stack(cn))) if lstm else (y, torch.stack(hn))


def _loop_module(base):
    """A subclass of the seqfast module `base` whose forward is `cell_loop`."""

    def forward(self, input, hx=None, *, resets=None):
        return cell_loop(self, input, hx, resets)

    return type(
        f"{base.__name__}Loop", (base,), {"forward": forward, "__doc__": f"`{base.__name__}` run by `cell_loop`."}
    )


LOOP_MODULES = {
    "rnn_tanh": _loop_module(seqfast.RNN),
    "rnn_relu": _loop_module(seqfast.RNN),
    "lstm": _loop_module(seqfast.LSTM),
    "gru": _loop_module(seqfast.GRU),
}
"""The modules the benchmarks' `torch` provider runs a shape with an option through: seqfast's, with `cell_loop` as
their forward."""
