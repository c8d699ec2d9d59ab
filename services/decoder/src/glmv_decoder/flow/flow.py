"""Speech tokens -> log-mel spectrogram (``flow``: MaskedDiffWithXvec).

prompt tokens + new tokens --embedding--> block-causal Conformer encoder --> Linear to 80 --> resample to
the mel frame count --> conditional flow matching (10 Euler steps, CFG 0.7) conditioned on the prompt mel
--> drop the prompt frames --> mel (1, 80, F) at 22050/256 frames per second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmv_common.errors import InvalidRequest
from glmv_decoder.config import FlowConfig
from glmv_decoder.flow.cfm import ConditionalCFM, draw_noise
from glmv_decoder.flow.encoder import BlockConformerEncoder
from glmv_decoder.flow.length_regulator import InterpolateRegulator

__all__ = ["FlowModel", "mel_frames"]

#: Mel frames per second of the flow output, hard-coded in the reference (22050 Hz / hop 256).
MEL_SAMPLE_RATE = 22050
MEL_HOP = 256
N_TIMESTEPS = 10


def mel_frames(n_tokens: int, input_frame_rate: float = 12.5) -> int:
    """Mel frames produced for ``n_tokens`` tokens (prompt included).

    The reference evaluates ``int32 / rate * 22050 / 256`` as float32 tensor operations in that order and
    truncates; this differs from exact integer arithmetic for a few lengths (e.g. 3392 -> 23373), so it is
    reproduced operation by operation.
    """
    n = torch.tensor([n_tokens], dtype=torch.int32)
    return int((n / input_frame_rate * MEL_SAMPLE_RATE / MEL_HOP).int().item())


class FlowModel(nn.Module):
    """The flow, with the published parameter names (``input_embedding``, ``encoder``, ``decoder``...).

    Always in eval mode (the reference never calls ``.eval()``, so its encoder dropout stays active; this
    implementation has eval semantics). ``batch_guidance``: see :mod:`glmv_decoder.flow.cfm`. Stateless
    between calls: one instance may serve concurrent streams.
    """

    def __init__(self, cfg: FlowConfig, batch_guidance: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_frame_rate = cfg.input_frame_rate
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = BlockConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = ConditionalCFM(cfg.decoder, batch_guidance)
        self.length_regulator = InterpolateRegulator(cfg.length_regulator)
        #: >1: ``inference_batch`` pads the frame axis to a multiple of this (masked, so results do not
        #: change beyond float rounding); used with a compiled estimator so that shapes repeat.
        self.pad_frames_to = 0
        self.eval()

    def train(self, mode: bool = True) -> FlowModel:  # inference-only: always eval
        return super().train(False)

    @property
    def mel_channels(self) -> int:
        return self.cfg.output_size

    def mel_frames(self, n_tokens: int) -> int:
        return mel_frames(n_tokens, self.input_frame_rate)

    def _check(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
    ) -> None:
        for name, t in (("token", token), ("prompt_token", prompt_token)):
            if t.dim() != 2 or t.shape[0] != 1:
                raise InvalidRequest(f"flow: {name} must have shape [1, N], got {list(t.shape)}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise InvalidRequest(f"flow: {name} must be an integer tensor, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
                raise InvalidRequest(
                    f"flow: {name} ids must be in [0, {self.cfg.vocab_size}), "
                    f"got [{int(t.min())}, {int(t.max())}]"
                )
        if token.shape[1] == 0:
            raise InvalidRequest("flow: token must hold at least one token")
        mel = self.cfg.output_size
        if prompt_feat.dim() != 3 or prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != mel:
            raise InvalidRequest(
                f"flow: prompt_feat must have shape [1, T, {mel}], got {list(prompt_feat.shape)}"
            )
        if embedding.shape != (1, self.cfg.spk_embed_dim):
            raise InvalidRequest(
                f"flow: embedding must have shape [1, {self.cfg.spk_embed_dim}], got {list(embedding.shape)}"
            )

    def inference(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Generate the mel for ``token`` [1, N] given the history ``prompt_token`` [1, P] and its mel
        ``prompt_feat`` [1, T, 80] (T may be 0), speaker ``embedding`` [1, 192] (zeros in GLM-4-Voice).

        Returns mel [1, 80, F] float32 on the model device, F = mel_frames(P + N) - T. Randomness: one
        normal draw of shape (1, 80, mel_frames(P + N)) from ``generator`` (the reference seeds its global
        RNG with 42 right before the same draw; seed ``generator`` with 42 to match it).
        """
        self._check(token, prompt_token, prompt_feat, embedding)
        param = self.input_embedding.weight
        device, dtype = param.device, param.dtype
        with torch.no_grad():
            spks = self.spk_embed_affine_layer(F.normalize(embedding.to(device=device, dtype=dtype), dim=1))
            tokens = torch.cat([prompt_token, token], dim=1).to(device=device, dtype=torch.long)
            frames = self.mel_frames(tokens.shape[1])
            n_prompt = prompt_feat.shape[1]
            if n_prompt > frames:
                raise InvalidRequest(
                    f"flow: prompt_feat has {n_prompt} frames, more than the {frames} frames "
                    "of prompt + new tokens"
                )
            h = self.encoder_proj(self.encoder(self.input_embedding(tokens)))
            mu = self.length_regulator(h, frames).transpose(1, 2).contiguous()  # (1, 80, M)
            cond = torch.zeros(1, self.cfg.output_size, frames, device=device, dtype=dtype)
            if n_prompt:
                cond[:, :, :n_prompt] = prompt_feat.to(device=device, dtype=dtype).transpose(1, 2)
            mel = self.decoder(mu, spks, cond, generator, n_timesteps=N_TIMESTEPS)
            return mel[:, :, n_prompt:].float().contiguous()

    def inference_batch(
        self,
        tokens: list[torch.Tensor],
        prompt_tokens: list[torch.Tensor],
        prompt_feats: list[torch.Tensor],
        generators: list[torch.Generator],
    ) -> list[torch.Tensor]:
        """``inference`` for several independent streams in one batched call (zero speaker embedding).

        Row i gets the arguments of stream i; rows of different lengths are right-padded and masked
        (encoder attention, estimator GroupNorm and attention), so each result equals
        ``inference(tokens[i], prompt_tokens[i], prompt_feats[i], zeros, generators[i])`` up to float
        rounding, with the same noise: row i's noise is drawn from ``generators[i]`` with the shape the
        unbatched call draws. The length regulator (cheap next to the 20 estimator passes) runs per row.
        """
        n = len(tokens)
        if not n or not len(prompt_tokens) == len(prompt_feats) == len(generators) == n:
            raise InvalidRequest("flow: inference_batch needs one prompt, feature and generator per row")
        zero_emb = torch.zeros(1, self.cfg.spk_embed_dim)
        for i in range(n):
            self._check(tokens[i], prompt_tokens[i], prompt_feats[i], zero_emb)
        param = self.input_embedding.weight
        device, dtype = param.device, param.dtype
        with torch.no_grad():
            spks = self.spk_embed_affine_layer(F.normalize(zero_emb.to(device=device, dtype=dtype), dim=1))
            seqs = [torch.cat([p, t], dim=1).to(device=device, dtype=torch.long)[0]
                    for p, t in zip(prompt_tokens, tokens, strict=True)]
            lengths = torch.tensor([len(q) for q in seqs], device=device)
            padded_tokens = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
            same_tokens = len({len(q) for q in seqs}) == 1  # no padding: no key mask needed
            h = self.encoder_proj(self.encoder(self.input_embedding(padded_tokens),
                                               None if same_tokens else lengths))
            frames = [self.mel_frames(len(q)) for q in seqs]
            n_prompts = [f.shape[1] for f in prompt_feats]
            for fr, n_p in zip(frames, n_prompts, strict=True):
                if n_p > fr:
                    raise InvalidRequest(f"flow: prompt_feat has {n_p} frames, more than the {fr} frames "
                                         "of prompt + new tokens")
            m_max = max(frames)
            if self.pad_frames_to > 1:  # bucketed shapes, so compiled graphs are reused
                m_max = -(-m_max // self.pad_frames_to) * self.pad_frames_to
            mu = torch.zeros(n, self.cfg.output_size, m_max, device=device, dtype=dtype)
            cond = torch.zeros_like(mu)
            x = torch.zeros(n, self.cfg.output_size, m_max, device=device)  # float32 noise
            mask = torch.zeros(n, 1, m_max, device=device, dtype=dtype)
            for i in range(n):
                fr, n_p = frames[i], n_prompts[i]
                mu[i, :, :fr] = self.length_regulator(h[i : i + 1, : len(seqs[i])], fr)[0].transpose(0, 1)
                if n_p:
                    cond[i, :, :n_p] = prompt_feats[i][0].to(device=device, dtype=dtype).transpose(0, 1)
                x[i, :, :fr] = draw_noise((1, self.cfg.output_size, fr), generators[i], x)[0]
                mask[i, :, :fr] = 1
            # Rows of one length (streams in step) need no mask: the plain kernels are cheaper.
            padded = min(frames) < m_max
            mel = self.decoder.solve(x, mu, spks.expand(n, -1).contiguous(), cond, N_TIMESTEPS,
                                     mask if padded else None)
            return [mel[i : i + 1, :, n_prompts[i] : frames[i]].float().contiguous() for i in range(n)]
