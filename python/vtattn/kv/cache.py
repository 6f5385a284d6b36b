"""`vtattn.kv.CompressedCache`: a transformers Cache that compresses each layer once, at prefill,
to a per-(batch, kv head) keep-set, then stores it in pages (`pages.Pages`) and grows by appending.

How a layer works with `attn_implementation="vtattn"` (`vtattn.patch.llava(model, kv=...)` sets
it): the prefill's `update` returns the full keys/values; vtattn's attention function, handed those
very tensors, runs the prompt's attention with its LSE, lets the layer's policy choose the keep-set
from exact scores (`key_importance`, no L x L tensor), merges evicted image KV if the policy asks,
and moves the kept rows to pages; the full prompt KV is then freed. Decode steps append and read
only the kept KV. Another attention implementation cannot read the pages: the next layer's
`update` raises.

Positions stay those of the uncompressed sequence: keys are cached after RoPE, and
`get_seq_length()` (and the mask sizes) count every token the layer was given, kept or not, so
`generate`'s cache_position / position ids continue from the uncompressed length. Padding (from
the attention mask) is never kept. A `DecodeH2O` policy also evicts while decoding (decode.py)."""
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import vtattn

from ._claim import LAST, publish
from .decode import evict, prompt_mass
from .merge import merge_kv
from .pages import Pages
from .policies import DecodeH2O, Policy


class Frame(NamedTuple):
    """A prefill that holds a subsequence of the prompt, in order (FastV's pruned layers): each
    row's original position (int64 [B, L]), the prompt's length (decode tokens continue from
    it) and the rows' modality (in place of the cache's, which is the whole prompt's)."""
    positions: torch.Tensor
    length: int
    modality: torch.Tensor | None


class CompressedCache(Cache):
    """policy: a `vtattn.kv` policy for every layer, a list with one per layer (None keeps that
    layer whole, padding aside), or None (nothing evicted). page_size: tokens per page; room:
    decode tokens of headroom each head gets (and gets again when it runs out). `modality` (bool
    [B, L], True = image token, or span ids) must be set before the prefill for policies that need
    it (LookM, Modality, merging); `vtattn.patch.llava` sets it."""

    def __init__(self, policy=None, *, page_size=16, room=32):
        for name, n in (("page_size", page_size), ("room", room)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {n!r}")
        for p in policy if isinstance(policy, (list, tuple)) else [policy]:
            if p is not None and not isinstance(p, Policy):
                raise TypeError(f"policy must be a vtattn.kv policy (LookM, SnapKV, ...), a list of them or None, "
                                f"got {type(p).__name__}")
        super().__init__(layers=[])
        self.policy, self.page_size, self.room = policy, page_size, room
        self.modality = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            i = len(self.layers)
            policy = self.policy[i] if isinstance(self.policy, (list, tuple)) else self.policy
            self.layers.append(CompressedLayer(self, i, policy))
        return self.layers[layer_idx].update(key_states, value_states)

    def kept_positions(self, layer_idx):
        """int64 [B, Hkv, L]: the original positions each (batch, kv head) holds, ascending for the
        prompt then the decoded tokens, -1 padded to the longest head."""
        layer = self.layers[layer_idx]
        if layer.pages is None:
            raise ValueError(f"layer {layer_idx} has not been compressed yet (no prefill ran through it)")
        return layer.pages.positions()

    def kv_bytes(self):
        """Bytes allocated for keys and values over all layers (pages, or uncompressed prefill KV)."""
        return sum(layer.nbytes for layer in self.layers)


class CompressedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache, index, policy):
        super().__init__()
        self.cache, self.index, self.policy = cache, index, policy
        self.seen = 0  # tokens given to this layer: the uncompressed length
        self.offset = 0  # original position of row `seen` minus `seen` (> 0 under FastV: fewer rows)
        self.pages = None
        self.base = None  # DecodeH2O: host int64 [B, Hkv], each head's length after the prefill
        self.queries = []  # DecodeH2O: the decode queries since its last eviction, [B, Hq, n, D] each

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        last = LAST.get()
        if (self.pages is None and self.keys is not None) or (
                last is not None and last[0].cache is self.cache and last[0].index == self.index - 1):
            raise RuntimeError("CompressedCache: a layer's keys were not read by vtattn's attention; run the model "
                               "with attn_implementation='vtattn' (vtattn.patch.llava(model, kv=...) sets it)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pages is None:
            self.keys, self.values = key_states, value_states
            out = key_states, value_states
        else:
            self.pages.append(key_states, value_states, self.seen + self.offset)
            out = self.pages.k, self.pages.v
        self.seen += key_states.shape[-2]
        publish(self, out[0])
        return out

    def attend(self, q, k, v, mask, scale, frame=None):
        """Attention of q [B, Hq, n, D] over this layer after `update` returned (k, v): the prefill
        (then compression), or the kept KV plus the new tokens. Returns [B, Hq, n, D]. A prefill
        of a subsequence of the prompt (FastV's pruned layers) gives its `Frame`."""
        if self.pages is None:
            valid = _valid_keys(mask, k.shape[2])
            out, lse = _prefill_attention(q, k, v, valid, scale)
            if frame is not None:
                self.offset = frame.length - self.seen
            self._compress(q, k, v, lse, valid, scale, frame)
            self.keys = self.values = None
            return out
        p = self.pages
        n, D = q.shape[2], q.shape[3]
        if n == 1:  # a decode step: the paged split-KV kernel, no host sync
            out = vtattn.decode_attention(q, p.k, p.v, p.lengths, block_table=p.table, scale=scale)
        else:
            B, H = p.lengths.shape
            start = self.seen - n + self.offset
            # several new tokens (stored already): original positions give exact causality among them
            out = vtattn.index_attention(q, p.k.view(1, 1, -1, D).expand(B, H, -1, -1),
                                         p.v.view(1, 1, -1, D).expand(B, H, -1, -1), p.slots(), kv_counts=p.lengths,
                                         q_positions=torch.arange(start, start + n, device=q.device),
                                         kv_positions=p.pos.view(-1), causal=True, scale=scale)
        if isinstance(self.policy, DecodeH2O):
            self._decoded(q, scale)
        return out

    def _decoded(self, q, scale):
        """DecodeH2O: note the step's queries; every `every` tokens, score them and evict."""
        D = q.shape[-1]
        self.queries.append(q if scale == D ** -0.5 else q * (scale * D ** 0.5))
        n = sum(x.shape[2] for x in self.queries)
        if n >= self.policy.every:
            queries, self.queries = torch.cat(self.queries, 2), []
            self.pages = evict(self.pages, queries, self.seen - n + self.offset, self.base, self.policy.recent,
                               self.cache.room)

    def _compress(self, q, k, v, lse, valid, scale, frame):
        B, H, L, D = k.shape
        if scale != D ** -0.5:  # the policies score with the default scale
            q = q * (scale * D ** 0.5)
        modality = self.cache.modality if frame is None else frame.modality
        if modality is not None and tuple(modality.shape) != (B, L):
            raise ValueError(f"CompressedCache.modality must be [B, L] = {(B, L)} for this prefill, "
                             f"got {tuple(modality.shape)}")
        rows = [None] * B if valid is None else [valid[b].nonzero()[:, 0] for b in range(B)]
        if valid is None and self.policy is not None:
            keep = self.policy.select(q, k, modality=modality, lse=lse)
            indices, counts, ranked = keep.indices, keep.counts, keep.scores
        else:  # padding: each sample alone on its own tokens, as it would be without the others
            indices, counts = _per_sample(self.policy, q, k, lse, modality, rows)
            ranked = None
        merge = getattr(self.policy, "merge", None)
        if merge is not None:
            image = torch.ones_like(k[..., 0], dtype=torch.bool) if modality is None else \
                (modality if modality.dtype == torch.bool else modality >= 0)[:, None, :].expand(B, H, L)
            if valid is not None:
                image = image & valid[:, None, :]
            k_rows, v_rows = merge_kv(k, v, indices, image, merge)
        else:
            at = indices.clamp(min=0)[..., None].expand(*indices.shape, D)
            k_rows, v_rows = k.gather(2, at), v.gather(2, at)
        positions = indices if frame is None else torch.where(  # kept positions are the prompt's
            indices >= 0, frame.positions[:, None, :].expand(B, H, L).gather(2, indices.clamp(min=0)), -1)
        scores = None
        if isinstance(self.policy, DecodeH2O):
            scores = prompt_mass(self.policy, ranked, q, k, lse).gather(2, indices.clamp(min=0))
        self.pages = Pages(k_rows, v_rows, positions, counts, self.cache.page_size, self.cache.room, scores)
        if scores is not None:
            self.base = self.pages.host_lengths.clone()

    @property
    def nbytes(self):
        if self.pages is not None:
            return self.pages.nbytes
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def get_seq_length(self):
        return self.seen

    def get_mask_sizes(self, query_length):
        return self.seen + query_length, 0

    def get_max_length(self):
        return -1

    def reset(self):
        self.keys = self.values = self.pages = self.base = None
        self.queries = []
        self.seen = self.offset = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx):
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices):
        if self.pages is not None:
            self._take(torch.as_tensor(indices, device=self.pages.k.device).long())

    def batch_repeat_interleave(self, repeats):
        if self.pages is not None:
            B = self.pages.lengths.shape[0]
            self._take(torch.arange(B, device=self.pages.k.device).repeat_interleave(repeats))

    def _take(self, rows):
        self.pages.take(rows)
        self.queries = [x[rows] for x in self.queries]
        if self.base is not None:
            self.base = self.base[rows.cpu()]


def _valid_keys(mask, L):
    """bool [B, L] padding mask from a prefill's 4-D attention mask (its last row sees every real
    key), or None when nothing is padded."""
    if mask is None:
        return None
    row = mask[:, 0, -1, :L]
    valid = row if row.dtype == torch.bool else row == 0
    return None if bool(valid.all()) else valid


def _prefill_attention(q, k, v, valid, scale):
    """Causal attention of the prompt and its LSE [B, Hq, L]; with padding, the real tokens of each
    sample packed into one varlen call (padded rows: out 0, LSE +inf, so they weigh nothing)."""
    if valid is None:
        return vtattn.attention(q, k, v, causal=True, scale=scale, return_lse=True)
    B, Hq, L, D = q.shape
    cu = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu[1:] = valid.sum(1).cumsum(0)
    packed = [t.transpose(1, 2)[valid] for t in (q, k, v)]
    out_p, lse_p = vtattn.varlen_attention(*packed, cu, cu, causal=True, scale=scale, return_lse=True)
    out = q.new_zeros(B, L, Hq, D)
    out[valid] = out_p
    lse = torch.full((B, L, Hq), float("inf"), device=q.device)
    lse[valid] = lse_p.t()
    return out.transpose(1, 2), lse.transpose(1, 2)


def _per_sample(policy, q, k, lse, modality, rows):
    """indices [B, H, K] (original positions, -1 padded) and counts [B, H] with each sample's
    policy run on its own real tokens (`rows[b]`, None = all)."""
    B, H, L = k.shape[:3]
    found = []
    for b, r in enumerate(rows):
        r = torch.arange(L, device=k.device) if r is None else r
        if policy is None:
            found.append((r.expand(H, len(r)), torch.full((H,), len(r), device=k.device)))
            continue
        mod = None if modality is None else modality[b:b + 1, r]
        keep = policy.select(q[b:b + 1, :, r], k[b:b + 1, :, r], modality=mod, lse=lse[b:b + 1, :, r])
        idx = keep.indices[0]
        found.append((torch.where(idx >= 0, r[idx.clamp(min=0)], -1), keep.counts[0]))
    K = max(i.shape[-1] for i, _ in found)
    indices = torch.full((B, H, K), -1, dtype=torch.int64, device=k.device)
    for b, (i, _) in enumerate(found):
        indices[b, :, :i.shape[-1]] = i
    return indices, torch.stack([c for _, c in found]).long()
