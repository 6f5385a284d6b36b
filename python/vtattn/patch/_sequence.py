"""Shortening a batch of multimodal token sequences after visual-token pruning, and continuing
the shortened sequences while decoding. Tensors in, tensors out: nothing here knows transformers."""
import torch


class Shrink:
    """How a batch of sequences [B, L] maps to its pruned form [B, W].

    Image i's span of spans[i] placeholder tokens (counted in (batch, sequence) order, as a
    processor expands them) keeps its first kept[i] slots, every other token stays, and rows are
    re-aligned by left padding to the longest (W). A kept token's position is its original position
    minus the tokens removed before it in its row: kept tokens take consecutive positions."""

    def __init__(self, input_ids, image_token_id, spans, kept):
        B, L = input_ids.shape
        device = input_ids.device
        spans = torch.as_tensor(spans, dtype=torch.long, device=device)
        kept = torch.as_tensor(kept, dtype=torch.long, device=device)
        is_image = input_ids == image_token_id
        found, expected = int(is_image.sum()), int(spans.sum())
        if found != expected:
            raise ValueError(f"input_ids hold {found} image tokens but the images need {expected} "
                             "(the <image> spans must be expanded as the processor does)")
        ordinal = is_image.flatten().cumsum(0).view(B, L) - 1
        ends = spans.cumsum(0)
        image = torch.searchsorted(ends, ordinal.clamp(min=0), right=True).clamp(max=len(spans) - 1)
        keep = ~is_image | (ordinal - (ends - spans)[image] < kept[image])
        removed = (~keep).long().cumsum(1)
        length = keep.sum(1)
        self.length, self.width = L, int(length.max())
        self.pad = self.width - length
        self.removed = removed[:, -1]
        dest = torch.where(keep, self.pad[:, None] + keep.long().cumsum(1) - 1, self.width)
        src = torch.zeros(B, self.width + 1, dtype=torch.long, device=device)
        self.src = src.scatter_(1, dest, torch.arange(L, device=device).expand(B, L))[:, :self.width]
        self.real = torch.arange(self.width, device=device) >= self.pad[:, None]
        self.shift = removed.gather(1, self.src)
        self.image = is_image.gather(1, self.src) & self.real
        self.mask = None

    def _take(self, x, fill):
        index = self.src if x.dim() == 2 else self.src[..., None].expand(-1, -1, x.shape[-1])
        real = self.real if x.dim() == 2 else self.real[..., None]
        return x.gather(1, index).masked_fill(~real, fill)

    def embeds(self, token_embeds, image_features):
        """[B, W, C]: the kept tokens' embeddings, the image slots filled with image_features
        ([T, C], images in order, each image's tokens in its own order)."""
        out = self._take(token_embeds, 0.0)
        return out.masked_scatter(self.image[..., None], image_features.to(out.device, out.dtype))

    def attention_mask(self, mask):
        """The shortened 2-D mask (alignment padding masked); kept for the decode steps."""
        if mask is None:
            mask = torch.ones(self.src.shape[0], self.length, dtype=torch.long, device=self.src.device)
        if mask.dim() != 2:
            raise NotImplementedError("visual-token pruning needs a 2-D attention mask (or none)")
        self.mask = self._take(mask, 0)
        return self.mask

    def positions(self, position_ids):
        """Shortened position ids; None stands for 0..L-1, what the language model would use."""
        if position_ids is None:
            position_ids = torch.arange(self.length, device=self.src.device)
        position_ids = position_ids.expand(self.src.shape[0], -1)
        return (self._take(position_ids, 0) - self.shift).masked_fill(~self.real, 0)

    def labels(self, labels):
        return None if labels is None else self._take(labels, -100)

    def continue_mask(self, mask, past, new):
        """The decode-step mask for a cache of `past` shortened tokens and `new` tokens: the
        shortened prefill mask, then the caller's mask past its original length."""
        grown = past + new - self.width
        if mask is None:
            tail = self.mask.new_ones(self.mask.shape[0], grown)
        elif mask.dim() == 2 and mask.shape[1] == self.length + grown:
            tail = mask[:, self.length:].to(self.mask.dtype)
        else:
            raise ValueError(f"the attention mask (shape {tuple(mask.shape)}) does not continue the pruned "
                             f"prefill: expected 2-D with {self.length + grown} columns")
        return torch.cat([self.mask, tail], dim=1)

    def continue_positions(self, position_ids, past, new):
        """Decode-step positions: the caller's minus the tokens pruned from the row; None stands
        for the language model's own (cache length onwards), counted without the alignment padding."""
        if position_ids is None:
            return past + torch.arange(new, device=self.src.device) - self.pad[:, None]
        return position_ids - self.removed[:, None]
