"""Integration features: what the NFM's integration MLP encodes.

1. :func:`interaction_hidden` - the integration MLP's hidden *pre-activation*
   ``W1 @ p + b1`` (``p`` the FM-pooled code, dropout off).
2. :func:`train_secondary_sae` - a secondary TopK SAE on those vectors (paper:
   300 -> 7,500 features, k = 250; defaults here scale as ``25 * K`` features
   and ``k = features / 30``).
3. :class:`ClampIntervention` - while the language model runs (or generates),
   the layer output ``h`` is replaced by ``h + (interaction' - interaction)``,
   where ``interaction'`` is the integration MLP's output after one secondary
   feature's activation was *clamped* to ``multiplier * a_ref`` (``a_ref`` the
   feature's mean non-zero activation on the training vectors; the secondary
   SAE's reconstruction error is kept, only the feature's contribution
   changes). Multipliers (-4, 0, 1, 4): reversed, ablated, typical, amplified.
4. :func:`clamp_logit_effects` - for every stimulus prompt, every multiplier
   and every word set: the change of the word set's mean next-token logit
   (relative to the mean change over the whole vocabulary, so a uniform logit
   shift counts as 0), averaged over ``max_new_tokens`` greedy generation
   steps taken under the clamp (each step compared with the unclamped model on
   the same context).
5. :func:`two_way_anova` - a 2x2 factorial ANOVA (formality x emotion) of
   those changes, Type III sums of squares with effect coding (exact for
   unbalanced cells too).

:data:`DEFAULT_STIMULI` (formal/casual x emotional/neutral prompts) and
:data:`DEFAULT_WORD_SETS` are written for this package.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..nn.running import eval_mode, iter_batches, model_device_dtype
from ..reference import functional as RF

Tensor = torch.Tensor

DEFAULT_MULTIPLIERS = (-4.0, 0.0, 1.0, 4.0)

#: 2x2 factorial stimuli: (formality, emotion) -> prompts. Written for dualenc_fast.
DEFAULT_STIMULI: Dict[Tuple[str, str], List[str]] = {
    ("formal", "emotional"): [
        "We regret to inform you that your beloved father passed away during the night, and",
        "It is with profound gratitude and heartfelt joy that the committee announces",
        "The board is deeply distressed by the tragic loss of our colleague, who",
        "Please accept my sincere condolences; the grief your family is enduring",
        "I am truly honoured and overwhelmed with emotion to accept this award, which",
        "The minister expressed deep sorrow and outrage at the violence, stating that",
    ],
    ("formal", "neutral"): [
        "The committee will convene on Tuesday to review the quarterly budget, and",
        "Pursuant to section four of the agreement, the tenant shall submit",
        "The report summarises the measurements collected during the second phase of",
        "Attendees are requested to register at the front desk prior to",
        "The department has revised its procedures for the processing of",
        "In accordance with the regulations, all documents must be filed by",
    ],
    ("casual", "emotional"): [
        "omg I literally cried so hard when my dog came home, I",
        "dude I'm so freaking happy right now, we actually won and",
        "honestly I'm heartbroken, she just left without even saying",
        "ugh I hate this so much, everything is going wrong and",
        "no way, I love you guys so much, this is the best",
        "I'm super scared about tomorrow, like what if it all",
    ],
    ("casual", "neutral"): [
        "so yeah I went to the store and grabbed some milk and",
        "hey can you send me the link to that spreadsheet thing, the",
        "gonna fix the bike tomorrow, just need a new chain and",
        "the bus was kinda late today so I just walked to the",
        "ok so the meeting got moved to three, and the room is",
        "I usually just make pasta on mondays with some cheese and",
    ],
}

#: Word sets whose logits are tracked (the first token of " word" is used).
DEFAULT_WORD_SETS: Dict[str, List[str]] = {
    "formal": ["therefore", "however", "regarding", "furthermore", "accordingly", "hereby", "pursuant", "shall"],
    "casual": ["yeah", "gonna", "cool", "stuff", "guys", "lol", "kinda", "dude"],
    "emotional": ["love", "hate", "afraid", "happy", "sad", "angry", "tears", "joy"],
    "neutral": ["table", "number", "report", "system", "data", "item", "section", "schedule"],
}


# ----------------------------------------------------------------------------
# the integration MLP's hidden pre-activation
# ----------------------------------------------------------------------------

def _fm_pool(model, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """``(p [B, K], output scale or None)`` for a joint model on raw inputs ``x``.

    Works for the reference modules (dense code) and the fused ones (sparse
    ``encode``; with input normalisation its scale is returned so outputs can
    be mapped back to raw units).
    """
    sae = model.primary_sae
    if hasattr(sae, "encode"):
        code = sae.encode(x)
        values, indices = code.values, code.indices
    else:
        dense = sae(x)[0]
        values, indices = RF.select_topk(dense, sae.k)
    top_n = getattr(model.nfm, "top_n", None)
    if top_n is not None and top_n < values.shape[-1]:
        values, indices = RF.topn_reselect(values, indices, top_n)
    p = RF.fm_interaction(values, indices, model.nfm.feature_embeddings.weight)
    scale = sae._scale() if hasattr(sae, "_scale") else None
    return p, scale


def _mlp_layers(model):
    mlp = model.nfm.interaction_mlp
    return mlp[1], mlp[3]


def interaction_hidden(model, x: Tensor) -> Tensor:
    """The integration MLP's hidden pre-activation ``W1 @ p + b1`` for ``x [B, d]`` (eval mode)."""
    with eval_mode(model):
        dev, dt = model_device_dtype(model)
        p, _ = _fm_pool(model, x.to(dev, dt))
        l1, _ = _mlp_layers(model)
        return p @ l1.weight.T + l1.bias


def collect_interaction_hidden(model, activations, *, batch_size: int = 4096,
                               max_rows: Optional[int] = None) -> Tensor:
    """:func:`interaction_hidden` over a tensor or loader of activations, on CPU."""
    return torch.cat([interaction_hidden(model, x).cpu() for x in iter_batches(activations, batch_size, max_rows)])


# ----------------------------------------------------------------------------
# secondary SAE
# ----------------------------------------------------------------------------

def train_secondary_sae(
    hidden: Tensor, *, n_features: Optional[int] = None, k: Optional[int] = None, steps: int = 2000,
    batch_size: int = 1024, lr: float = 1e-3, seed: int = 0, device=None, log_every: int = 0,
):
    """Train a TopK SAE (reference module) on integration-MLP pre-activations ``[N, K]``.

    Defaults: ``n_features = 25 * K`` (paper: 300 -> 7,500), ``k = max(1,
    n_features // 30)`` (paper: 250). Adam, MSE, random minibatches.
    Returns the trained module in eval mode, with ``a_ref`` (mean non-zero
    activation per feature, see :func:`feature_reference_activation`) and
    ``train_fvu`` attached as attributes.
    """
    from ..reference.modules import TopKSparseAutoencoder

    hidden = hidden.detach().float()
    N, K = hidden.shape
    n_features = n_features or 25 * K
    k = k or max(1, n_features // 30)
    k = min(k, n_features)
    g = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sae = TopKSparseAutoencoder(K, n_features, k)
    torch.random.set_rng_state(torch_state)
    if device is not None:
        sae.to(device)
        hidden_dev = hidden.to(device)
    else:
        hidden_dev = hidden
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.train()
    for step in range(steps):
        idx = torch.randint(0, N, (min(batch_size, N),), generator=g).to(hidden_dev.device)
        xb = hidden_dev[idx]
        _, rec = sae(xb)
        loss = (rec - xb).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  secondary SAE step {step + 1}/{steps} mse {loss.item():.4g}")
    sae.eval()
    with torch.no_grad():
        sse, tss = 0.0, 0.0
        mean = hidden_dev.mean(0)
        for xb in hidden_dev.split(4096):
            _, rec = sae(xb)
            sse += float((rec - xb).double().pow(2).sum())
            tss += float((xb - mean).double().pow(2).sum())
    sae.train_fvu = sse / tss if tss > 0 else float("nan")
    sae.a_ref = feature_reference_activation(sae, hidden_dev)
    return sae


@torch.no_grad()
def feature_reference_activation(sae, hidden: Tensor, batch_size: int = 4096) -> Tensor:
    """Per secondary feature, its mean activation over the rows where it is active
    (0 for never-active features): the unit of the clamp multipliers."""
    total = None
    count = None
    for xb in hidden.split(batch_size):
        code, _ = sae(xb.to(sae.decoder.weight.device, sae.decoder.weight.dtype))
        s, c = code.sum(0).double(), (code > 0).sum(0).double()
        total = s if total is None else total + s
        count = c if count is None else count + c
    return (total / count.clamp_min(1)).float().cpu()


# ----------------------------------------------------------------------------
# clamping inside the language model
# ----------------------------------------------------------------------------

class ClampIntervention:
    """Clamp one secondary feature while the LM runs.

    Installs a forward hook on ``decoder_layers(lm)[layer]`` that replaces the
    layer output ``h`` by ``h + (interaction' - interaction) / scale_in`` where
    ``interaction'`` is computed with the integration-MLP pre-activation
    ``pre' = pre + (c - g_j) * D2[:, j]`` (``g`` the secondary code of ``pre``,
    ``D2`` its decoder, ``c = value``; ``value`` may also be a ``[batch]`` tensor,
    one value per sequence, NaN leaving that sequence untouched). ``scale_in`` is the activation scale the
    joint model expects (as :func:`dualenc_fast.eval.metrics.splice_test`'s ``scale``).
    The first ``skip_first`` positions of each call's sequence are left alone
    (attention-sink positions the models never saw; set it to 0 for calls that
    only feed new tokens through a KV cache).
    Set :attr:`value` to ``None`` to disable. Use as a context manager.
    """

    def __init__(self, lm, layer: int, model, sae2, feature: int, value: Optional[float] = None,
                 scale: float = 1.0, skip_first: int = 0):
        from ..lm import decoder_layers

        self.layer_module = decoder_layers(lm)[layer]
        self.model = model
        self.sae2 = sae2
        self.feature = int(feature)
        self.value = value
        self.scale = float(scale)
        self.skip_first = int(skip_first)
        self.handle = None

    def delta(self, h: Tensor) -> Tensor:
        """The change this clamp makes to layer output ``h [..., d]`` (zeros when disabled)."""
        if self.value is None:
            return torch.zeros_like(h)
        model, sae2, j = self.model, self.sae2, self.feature
        dev, dt = model_device_dtype(model)
        flat = h.reshape(-1, h.shape[-1]).to(dev, dt) * self.scale
        with eval_mode(model), eval_mode(sae2):
            p, out_scale = _fm_pool(model, flat)
            l1, l2 = _mlp_layers(model)
            pre = p @ l1.weight.T + l1.bias
            w2 = sae2.decoder.weight
            code, _ = sae2(pre.to(w2.device, w2.dtype))
            g_j = code[:, j:j + 1].to(pre.device, pre.dtype)
            d2 = w2[:, j].to(pre.device, pre.dtype)
            value = self.value
            keep = None
            if isinstance(value, torch.Tensor):  # one value per batch row; NaN = row untouched
                per_pos = flat.shape[0] // value.numel()
                value = value.to(pre.device, pre.dtype).repeat_interleave(per_pos).unsqueeze(1)
                keep = ~torch.isnan(value)
                value = torch.nan_to_num(value)
            pre2 = pre + (value - g_j) * d2
            out = torch.relu(pre) @ l2.weight.T
            out2 = torch.relu(pre2) @ l2.weight.T
            diff = out2 - out
            if keep is not None:
                diff = diff * keep
            if out_scale is not None:
                diff = diff / out_scale
            diff = diff / self.scale
        diff = diff.reshape(h.shape).to(h.device, h.dtype)
        if self.skip_first and diff.dim() == 3:
            diff[:, : self.skip_first] = 0
        return diff

    def _hook(self, module, inputs, output):
        from ..lm import layer_output, replace_layer_output

        if self.value is None:
            return None
        h = layer_output(output)
        return replace_layer_output(output, h + self.delta(h))

    def __enter__(self):
        self.handle = self.layer_module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        return False


def _encode(tokenizer, text: str) -> List[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text))


def word_set_token_ids(tokenizer, word_sets: Mapping[str, Sequence]) -> Dict[str, List[int]]:
    """First token id of ``" " + word`` for each word (ints are taken as token ids)."""
    out = {}
    for name, words in word_sets.items():
        ids = []
        for w in words:
            if isinstance(w, (int, np.integer)):
                ids.append(int(w))
            else:
                toks = _encode(tokenizer, " " + w)
                if toks:
                    ids.append(int(toks[0]))
        out[name] = sorted(set(ids))
    return out


def _last_logits(lm, ids: Tensor, past=None):
    """Next-token logits ``[B, V]`` (float32) and the KV cache (None if the LM gives none).

    With a cache only the new tokens are fed; the clamp hook then sees only
    their positions, which is exactly what it should change.
    """
    import inspect

    params = inspect.signature(lm.forward).parameters
    kwargs = {"input_ids": ids, "use_cache": True}
    if past is not None:
        # newer transformers name the cache argument ``cache``; older ``past_key_values``
        kwargs["cache" if "cache" in params else "past_key_values"] = past
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = lm(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return logits[:, -1].float(), cache


@torch.no_grad()
def clamp_logit_effects(
    lm, tokenizer, layer: int, model, sae2, feature: int, *,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    stimuli: Optional[Mapping[Tuple[str, str], Sequence[str]]] = None,
    word_sets: Optional[Mapping[str, Sequence]] = None,
    a_ref: Optional[float] = None, max_new_tokens: int = 3, scale: float = 1.0,
    prompt_ids: Optional[Mapping[Tuple[str, str], Sequence[Sequence[int]]]] = None,
    return_generations: bool = True, skip_first: int = 0,
) -> Dict[str, Any]:
    """Logit changes of word sets under a clamped secondary feature, per prompt.

    ``stimuli``: ``(factor A level, factor B level) -> prompts`` (default
    :data:`DEFAULT_STIMULI`); ``prompt_ids`` may give token ids instead (then
    ``tokenizer`` is only used for word sets given as strings). ``a_ref``
    defaults to ``sae2.a_ref[feature]`` (or 1.0). Returns ``rows`` (one per
    prompt x multiplier x word set: ``a``, ``b``, ``prompt``, ``multiplier``,
    ``word_set``, ``delta``) and, with ``return_generations``, the greedy
    continuation under each multiplier for the first prompt of each cell.
    ``skip_first``: prompt positions left unclamped (use the activation
    store's ``skip_first``: the models never saw those positions).
    """
    if prompt_ids is None:
        stimuli = stimuli or DEFAULT_STIMULI
        prompt_ids = {cell: [_encode(tokenizer, p) for p in ps] for cell, ps in stimuli.items()}
        texts = {cell: list(ps) for cell, ps in stimuli.items()}
    else:
        texts = {cell: [str(list(p)) for p in ps] for cell, ps in prompt_ids.items()}
    ws = word_set_token_ids(tokenizer, word_sets or DEFAULT_WORD_SETS)
    if a_ref is None:
        ref = getattr(sae2, "a_ref", None)
        a_ref = float(ref[feature]) if ref is not None else 1.0
        if not a_ref > 0:
            a_ref = 1.0
    device = next(lm.parameters()).device
    was = lm.training
    lm.eval()
    rows: List[Dict[str, Any]] = []
    gens: List[Dict[str, Any]] = []
    mults = [float(m) for m in multipliers]
    M = len(mults)
    # one batch per generation step: M unclamped rows then M clamped rows (same lengths)
    values = torch.tensor([float("nan")] * M + [m * a_ref for m in mults])
    clamp = ClampIntervention(lm, layer, model, sae2, feature, None, scale=scale, skip_first=skip_first)
    steps = max(1, max_new_tokens)
    try:
        with clamp:
            for cell, plist in prompt_ids.items():
                for pi, ids0 in enumerate(plist):
                    ctx = torch.tensor([list(ids0)] * M, dtype=torch.long, device=device)
                    deltas = torch.zeros(M, len(ws), dtype=torch.float64)
                    feed, past = torch.cat([ctx, ctx]), None
                    for _ in range(steps):
                        clamp.value = values
                        clamp.skip_first = skip_first if past is None else 0  # cached calls: new tokens only
                        logits, past = _last_logits(lm, feed, past)
                        clamp.value = None
                        diff = logits[M:] - logits[:M]  # [M, V]
                        centre = diff.mean(-1)
                        for wi, (name, tok) in enumerate(ws.items()):
                            if tok:
                                deltas[:, wi] += (diff[:, tok].mean(-1) - centre).double().cpu()
                        nxt = logits[M:].argmax(-1, keepdim=True)  # greedy, clamped trajectory
                        ctx = torch.cat([ctx, nxt], dim=1)
                        feed = torch.cat([nxt, nxt]) if past is not None else torch.cat([ctx, ctx])
                    deltas /= steps
                    for mi, m in enumerate(mults):
                        for wi, name in enumerate(ws):
                            rows.append({"a": cell[0], "b": cell[1], "prompt": pi, "multiplier": m,
                                         "word_set": name, "delta": float(deltas[mi, wi])})
                        if return_generations and pi == 0:
                            new = ctx[mi, len(ids0):].tolist()
                            text = tokenizer.decode(new) if hasattr(tokenizer, "decode") else str(new)
                            gens.append({"cell": list(cell), "prompt": texts[cell][0], "multiplier": m,
                                         "continuation": text})
    finally:
        clamp.value = None
        lm.train(was)
    return {"feature": int(feature), "a_ref": float(a_ref), "multipliers": mults,
            "word_sets": {k: len(v) for k, v in ws.items()}, "rows": rows, "generations": gens}


# ----------------------------------------------------------------------------
# two-way ANOVA
# ----------------------------------------------------------------------------

def two_way_anova(y, a, b) -> Dict[str, Any]:
    """Two-way ANOVA with interaction for two 2-level factors (any cell sizes).

    Effect coding (+1/-1) and Type III sums of squares: each term's SS is the
    increase of the residual SS when that term is dropped from the full model
    ``y ~ 1 + A + B + A:B``. Returns per term (``A``, ``B``, ``A:B``) ``ss``,
    ``df``, ``F``, ``p`` and partial eta squared, plus the residual ``ss``/``df``
    and the cell means.
    """
    from scipy import stats

    y = np.asarray(y, dtype=np.float64)
    a = np.asarray(a)
    b = np.asarray(b)
    la, lb = sorted(set(a.tolist())), sorted(set(b.tolist()))
    if len(la) != 2 or len(lb) != 2:
        raise ValueError(f"two_way_anova needs two levels per factor, got {la} and {lb}")
    xa = np.where(a == la[0], 1.0, -1.0)
    xb = np.where(b == lb[0], 1.0, -1.0)
    cols = {"A": xa, "B": xb, "A:B": xa * xb}
    n = y.size

    def rss(names):
        X = np.column_stack([np.ones(n)] + [cols[c] for c in names])
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        r = y - X @ beta
        return float(r @ r)

    full = rss(["A", "B", "A:B"])
    df_res = n - 4
    out: Dict[str, Any] = {"n": int(n), "levels": {"A": la, "B": lb},
                           "residual": {"ss": full, "df": int(df_res)}}
    ms_res = full / df_res if df_res > 0 else float("nan")
    for term in ("A", "B", "A:B"):
        ss = rss([c for c in ("A", "B", "A:B") if c != term]) - full
        F = ss / ms_res if df_res > 0 and ms_res > 0 else float("nan")
        p = float(stats.f.sf(F, 1, df_res)) if np.isfinite(F) else float("nan")
        out[term] = {"ss": ss, "df": 1, "F": F, "p": p,
                     "partial_eta_sq": ss / (ss + full) if ss + full > 0 else float("nan")}
    out["cell_means"] = {f"{ia}|{ib}": float(y[(a == ia) & (b == ib)].mean())
                         for ia in la for ib in lb if ((a == ia) & (b == ib)).any()}
    return out


def factorial_anova(effects: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """:func:`two_way_anova` of ``delta`` for every (multiplier, word set) in
    :func:`clamp_logit_effects` output; keys ``"x{multiplier}/{word set}"``; each
    result also has ``mean_abs_delta`` (the effect size in logits)."""
    rows = effects["rows"]
    out = {}
    for m in effects["multipliers"]:
        for ws in effects["word_sets"]:
            sel = [r for r in rows if r["multiplier"] == m and r["word_set"] == ws]
            if len({(r["a"], r["b"]) for r in sel}) < 4 or len(sel) <= 4:
                continue
            res = two_way_anova([r["delta"] for r in sel], [r["a"] for r in sel], [r["b"] for r in sel])
            res["mean_abs_delta"] = float(np.mean([abs(r["delta"]) for r in sel]))
            out[f"x{m:g}/{ws}"] = res
    return out


# ----------------------------------------------------------------------------
# the whole study
# ----------------------------------------------------------------------------

@torch.no_grad()
def select_features(lm, tokenizer, layer: int, model, sae2, *, n: int = 3,
                    stimuli=None, scale: float = 1.0, skip_first: int = 0) -> List[int]:
    """Secondary features whose mean activation on the stimulus prompts has the
    largest |2x2 interaction contrast| (formal-emotional - formal-neutral -
    casual-emotional + casual-neutral); ties/zeros fall back to activation mass."""
    from ..lm import LayerSplice, decoder_layers

    stimuli = stimuli or DEFAULT_STIMULI
    device = next(lm.parameters()).device
    cells = sorted(stimuli)
    splice = LayerSplice(decoder_layers(lm)[layer])
    means = []
    try:
        for cell in cells:
            acc = None
            for text in stimuli[cell]:
                ids = torch.tensor([_encode(tokenizer, text)], device=device)
                lm(input_ids=ids, use_cache=False)
                h = splice.captured[0, skip_first:]
                if h.shape[0] == 0:
                    continue
                pre = interaction_hidden(model, h * scale)
                code, _ = sae2(pre.to(sae2.decoder.weight.device, sae2.decoder.weight.dtype))
                m = code.mean(0).cpu()
                acc = m if acc is None else acc + m
            means.append(acc / len(stimuli[cell]))
    finally:
        splice.remove()
    M = torch.stack(means)  # cells sorted: (casual,emotional),(casual,neutral),(formal,emotional),(formal,neutral)
    contrast = (M[0] - M[1] - M[2] + M[3]).abs() if len(cells) == 4 else M.sum(0)
    score = contrast + 1e-6 * M.sum(0)
    return [int(i) for i in torch.argsort(score, descending=True)[:n]]


def integration_study(
    lm, tokenizer, layer: int, model, activations, *, sae2=None, features: Optional[Sequence[int]] = None,
    n_features: int = 3, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, stimuli=None, word_sets=None,
    max_new_tokens: int = 3, scale: float = 1.0, max_rows: Optional[int] = 20000,
    sae2_kwargs: Optional[dict] = None, skip_first: int = 0,
) -> Dict[str, Any]:
    """Secondary SAE + clamping + ANOVA for a joint model, as a JSON-ready dict.

    Trains the secondary SAE on :func:`collect_interaction_hidden` of
    ``activations`` (at most ``max_rows`` rows) unless ``sae2`` is given,
    picks ``n_features`` features with :func:`select_features` unless
    ``features`` is given, then runs :func:`clamp_logit_effects` and
    :func:`factorial_anova` for each. ``skip_first`` prompt positions are
    never clamped (nor used for feature selection). The secondary SAE is
    returned under ``"_sae2"`` (not JSON).
    """
    hidden = collect_interaction_hidden(model, activations, max_rows=max_rows)
    if sae2 is None:
        kw = dict(sae2_kwargs or {})
        kw.setdefault("device", model_device_dtype(model)[0])
        sae2 = train_secondary_sae(hidden, **kw)
    if not hasattr(sae2, "a_ref"):
        sae2.a_ref = feature_reference_activation(sae2, hidden.to(sae2.decoder.weight.device))
    if features is None:
        features = select_features(lm, tokenizer, layer, model, sae2, n=n_features, stimuli=stimuli, scale=scale,
                                   skip_first=skip_first)
    res: Dict[str, Any] = {
        "secondary_sae": {"input_dim": int(hidden.shape[1]), "n_features": int(sae2.hidden_dim),
                          "k": int(sae2.k), "train_fvu": float(getattr(sae2, "train_fvu", float("nan"))),
                          "n_rows": int(hidden.shape[0])},
        "features": {},
    }
    for j in features:
        eff = clamp_logit_effects(lm, tokenizer, layer, model, sae2, j, multipliers=multipliers,
                                  stimuli=stimuli, word_sets=word_sets, max_new_tokens=max_new_tokens,
                                  scale=scale, skip_first=skip_first)
        eff["anova"] = factorial_anova(eff)
        res["features"][str(j)] = eff
    res["_sae2"] = sae2
    return res
