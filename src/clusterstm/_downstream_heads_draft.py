# ---------------------------------------------------------------------------------------------------------------------
# Downstream heads: video-text retrieval, video question answering, video captioning
# ---------------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring, can_return_tuple

from .configuration_clusterstm import ClusterSTMConfig
from .modeling_clusterstm import (
    ClusterSTMMLMHead,
    ClusterSTMModel,
    ClusterSTMPreTrainedModel,
    video_text_contrastive_loss,
)


@auto_docstring
@dataclass
class ClusterSTMVideoTextRetrievalOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss` is `True`):
        Contrastive loss plus `matching_loss_weight` times the video-text matching loss.
    contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Symmetric video-text contrastive loss.
    matching_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Video-text matching loss on the positives and one hard negative per video and per text; `None` when its
        weight is 0 or the batch has a single pair.
    logits_per_video (`torch.FloatTensor` of shape `(video_batch_size, text_batch_size)`):
        Scaled cosine similarities between the video and the text embeddings.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, video_batch_size)`):
        Scaled cosine similarities between the text and the video embeddings.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised text embeddings.
    video_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised video embeddings.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    matching_loss: torch.FloatTensor | None = None
    logits_per_video: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class ClusterSTMVideoQuestionAnsweringOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Cross-entropy over the answer vocabulary (labels of -100 are ignored).
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Scores of every answer of the vocabulary (`config.id2label`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class ClusterSTMVideoCaptioningOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Next-token cross-entropy (teacher forcing), averaged over the tokens whose label is not -100.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Next-token scores at every position.
    video_embeds (`torch.FloatTensor` of shape `(batch_size, num_video_tokens, hidden_size)`):
        The video tokens the decoder cross-attended to (re-usable with `video_embeds=` to skip the video tower).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None


def _check_video_text_batch(pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None) -> None:
    if pixel_values is None:
        raise ValueError("`pixel_values` (batch_size, num_frames, num_channels, height, width) is required.")
    if input_ids is None:
        raise ValueError("`input_ids` is required.")
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"pixel_values has batch size {pixel_values.shape[0]} but input_ids has {input_ids.shape[0]}; pass one "
            "text per video."
        )


@auto_docstring(
    custom_intro="""
    ClusterSTM for text-video retrieval: the dual encoder fine-tuned with the contrastive loss (plus the video-text
    matching loss), with a matching head that re-ranks the top-k candidates at inference (the UMT protocol) and an
    opt-in dual-softmax re-ranking.
    """
)
class ClusterSTMForVideoTextRetrieval(ClusterSTMPreTrainedModel):
    config: ClusterSTMConfig
    # Trainer must scale the (per-batch mean) loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        self.clusterstm = ClusterSTMModel(config)
        # Same name as in `ClusterSTMForPreTraining`, so a pretrained matching head is loaded.
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.clusterstm.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.clusterstm.text_model.embeddings.word_embeddings = value

    def encode_videos(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        return_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        L2-normalised video embeddings `(batch_size, projection_dim)`; with `return_tokens`, also the video tokens
        `(batch_size, num_tokens, hidden_size)` the matching head needs for re-ranking.
        """
        vision_outputs = self.clusterstm.vision_model(
            pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True
        )
        embeds = nn.functional.normalize(self.clusterstm.visual_projection(vision_outputs.pooler_output), dim=-1)
        if return_tokens:
            return embeds, vision_outputs.last_hidden_state
        return embeds

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings `(batch_size, projection_dim)` (the text-only layers, no video)."""
        text_outputs = self.clusterstm.text_model(input_ids=input_ids, attention_mask=attention_mask, mode="text")
        return nn.functional.normalize(self.clusterstm.text_projection(text_outputs.pooler_output), dim=-1)

    @staticmethod
    def similarity(
        text_embeds: torch.Tensor,
        video_embeds: torch.Tensor,
        dual_softmax: bool = False,
        temperature: float = 100.0,
        direction: str = "t2v",
    ) -> torch.Tensor:
        """
        Cosine similarities `(num_texts, num_videos)` of normalised embeddings.

        With `dual_softmax=True` (opt-in inference re-ranking, CAMoE/DSL), every score is multiplied by a softmax
        prior over the other modality: over the texts for text-to-video ranking (`direction="t2v"`), over the
        videos for video-to-text ranking (`direction="v2t"`). Report metrics with and without it.
        """
        if direction not in ("t2v", "v2t"):
            raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}.")
        sim = text_embeds.float() @ video_embeds.float().t()
        if dual_softmax:
            sim = sim * torch.softmax(temperature * sim, dim=0 if direction == "t2v" else 1)
        return sim

    def match_scores(
        self,
        video_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Probability `(batch_size,)` that text `i` matches video `i` (the matching head on the fused [CLS])."""
        if video_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Got {video_tokens.shape[0]} videos for {input_ids.shape[0]} texts; pass pairs.")
        fused = self.clusterstm.text_model(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=video_tokens, mode="multimodal"
        )
        return self.itm_head(fused.last_hidden_state[:, 0]).float().softmax(dim=-1)[:, 1]

    def rerank(
        self,
        similarity: torch.Tensor,
        video_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        top_k: int = 16,
        direction: str = "t2v",
        batch_size: int = 64,
    ) -> torch.Tensor:
        """
        Re-rank the `top_k` candidates of every query row with the matching head (the UMT / BLIP protocol).

        Args:
            similarity (`torch.Tensor` of shape `(num_queries, num_candidates)`): first-stage scores.
            video_tokens (`torch.Tensor`): for `"t2v"`, the tokens of all candidate videos
                `(num_candidates, num_tokens, hidden)`; for `"v2t"`, the tokens of the query videos `(num_queries, ...)`.
            input_ids, attention_mask (`torch.Tensor`): for `"t2v"`, the query texts `(num_queries, L)`; for `"v2t"`,
                all candidate texts `(num_candidates, L)`.
            top_k (`int`): candidates re-scored per query.
            direction (`str`): `"t2v"` (rows are texts) or `"v2t"` (rows are videos).
            batch_size (`int`): pairs fused at once.

        Returns:
            Scores with the layout of `similarity`: the top-k candidates of a row are placed above all the others
            (in the order of their matching probability); the others keep their first-stage scores, so ranks beyond
            `top_k` are unchanged and `top_k=1` changes no ranking.
        """
        if direction not in ("t2v", "v2t"):
            raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}.")
        if similarity.ndim != 2:
            raise ValueError(f"similarity must be (num_queries, num_candidates), got {tuple(similarity.shape)}.")
        num_queries, num_candidates = similarity.shape
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        top_k = min(top_k, num_candidates)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        topk_idx = similarity.topk(top_k, dim=1).indices  # (Q, k)
        query_idx = torch.arange(num_queries, device=similarity.device)[:, None].expand(-1, top_k)
        if direction == "t2v":
            text_idx, video_idx = query_idx.reshape(-1), topk_idx.reshape(-1)
        else:
            text_idx, video_idx = topk_idx.reshape(-1), query_idx.reshape(-1)
        probs = []
        for start in range(0, text_idx.shape[0], batch_size):
            t, v = text_idx[start : start + batch_size], video_idx[start : start + batch_size]
            probs.append(
                self.match_scores(
                    video_tokens[v.to(video_tokens.device)],
                    input_ids[t.to(input_ids.device)],
                    attention_mask[t.to(attention_mask.device)],
                )
            )
        probs = torch.cat(probs).reshape(num_queries, top_k).to(similarity.dtype)
        reranked = similarity.clone()
        # Lift the re-scored candidates above every first-stage score of their row (probabilities lie in [0, 1]).
        offset = similarity.max(dim=1, keepdim=True).values + 2.0
        reranked.scatter_(1, topk_idx, offset + probs)
        return reranked

    def _matching_loss(
        self,
        text_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        video_tokens: torch.Tensor,
        logits_per_text: torch.Tensor,
    ) -> torch.Tensor:
        """Matching loss on the positives plus one hard negative video per text and one hard negative text per video."""
        batch_size = text_hidden_states.shape[0]
        with torch.no_grad():
            eye = torch.eye(batch_size, dtype=torch.bool, device=logits_per_text.device)
            # Hard negatives in proportion to their similarity; the positive is never drawn.
            weights_text_to_video = logits_per_text.float().softmax(dim=1).add(1e-8).masked_fill(eye, 0.0)
            weights_video_to_text = logits_per_text.t().float().softmax(dim=1).add(1e-8).masked_fill(eye, 0.0)
            negative_videos = torch.multinomial(weights_text_to_video, 1).squeeze(1)
            negative_texts = torch.multinomial(weights_video_to_text, 1).squeeze(1)
        texts = torch.cat([text_hidden_states, text_hidden_states, text_hidden_states[negative_texts]], dim=0)
        masks = torch.cat([attention_mask, attention_mask, attention_mask[negative_texts]], dim=0)
        videos = torch.cat([video_tokens, video_tokens[negative_videos], video_tokens], dim=0)
        fused = self.clusterstm.text_model(
            attention_mask=masks, text_hidden_states=texts, encoder_hidden_states=videos, mode="fusion"
        )
        logits = self.itm_head(fused.last_hidden_state[:, 0]).float()
        labels = torch.zeros(3 * batch_size, dtype=torch.long, device=logits.device)
        labels[:batch_size] = 1
        return nn.functional.cross_entropy(logits, labels)

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMVideoTextRetrievalOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit video token mask (`True` = dropped), see [`ClusterSTMVisionModel`].
        return_loss (`bool`, *optional*):
            Whether to return the contrastive (+ weighted matching) loss; row `i` of the videos and of the texts is a
            positive pair.
        """
        _check_video_text_batch(pixel_values, input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_outputs = self.clusterstm.vision_model(
            pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True
        )
        text_outputs = self.clusterstm.text_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, mode="text"
        )
        video_embeds = nn.functional.normalize(self.clusterstm.visual_projection(vision_outputs.pooler_output), dim=-1)
        text_embeds = nn.functional.normalize(self.clusterstm.text_projection(text_outputs.pooler_output), dim=-1)
        logit_scale = self.clusterstm.scaled_logit_scale()
        logits_per_text = torch.matmul(text_embeds, video_embeds.t()) * logit_scale
        logits_per_video = logits_per_text.t()

        loss = contrastive_loss = matching_loss = None
        if return_loss:
            contrastive_loss = video_text_contrastive_loss(video_embeds, text_embeds, logit_scale)
            loss = contrastive_loss
            # CODEPATH: loss weight (fine-tuning setting); 0 trains the dual encoder alone.
            if self.config.matching_loss_weight > 0 and input_ids.shape[0] > 1:
                matching_loss = self._matching_loss(
                    text_outputs.last_hidden_state, attention_mask, vision_outputs.last_hidden_state, logits_per_text
                )
                loss = loss + self.config.matching_loss_weight * matching_loss

        return ClusterSTMVideoTextRetrievalOutput(
            loss=loss,
            contrastive_loss=contrastive_loss,
            matching_loss=matching_loss,
            logits_per_video=logits_per_video,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            video_embeds=video_embeds,
        )


class ClusterSTMQuestionAnsweringHead(nn.Module):
    """MLP classifier on the fused [CLS] token: dense -> activation -> LayerNorm -> answer scores."""

    def __init__(self, config: ClusterSTMConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.dense = nn.Linear(hidden_size, 2 * hidden_size)
        self.activation = ACT2FN[config.text_config.hidden_act]
        self.LayerNorm = nn.LayerNorm(2 * hidden_size, eps=config.text_config.layer_norm_eps)
        self.classifier = nn.Linear(2 * hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.LayerNorm(self.activation(self.dense(hidden_states))))


@auto_docstring(
    custom_intro="""
    ClusterSTM for open-ended video question answering as classification over a fixed answer vocabulary
    (`config.id2label`): the question tokens cross-attend to the video tokens in the fusion layers, and an MLP on the
    fused [CLS] token scores every answer.
    """
)
class ClusterSTMForVideoQuestionAnswering(ClusterSTMPreTrainedModel):
    config: ClusterSTMConfig
    accepts_loss_kwargs = False

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.clusterstm = ClusterSTMModel(config)
        self.qa_head = ClusterSTMQuestionAnsweringHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.clusterstm.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.clusterstm.text_model.embeddings.word_embeddings = value

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMVideoQuestionAnsweringOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit video token mask (`True` = dropped), see [`ClusterSTMVisionModel`].
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Index of the answer in `config.id2label`; -100 (an answer outside the vocabulary) is ignored by the loss.
        """
        _check_video_text_batch(pixel_values, input_ids)
        video_tokens = self.clusterstm.vision_model(
            pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True
        ).last_hidden_state
        fused = self.clusterstm.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            encoder_hidden_states=video_tokens,
            mode="multimodal",
        )
        logits = self.qa_head(fused.last_hidden_state[:, 0])

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            token_losses = nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            # Sum / count (clamped): a batch whose answers are all out of vocabulary gives 0, not NaN.
            loss = token_losses / (labels != -100).sum().clamp(min=1)
        return ClusterSTMVideoQuestionAnsweringOutput(loss=loss, logits=logits)


@auto_docstring(
    custom_intro="""
    ClusterSTM for video captioning: the text tower run left to right (causal self-attention) with every layer's
    cross-attention on the video tokens, and a language-modelling head initialised from the pretraining MLM head
    (tied to the word embeddings). Trained with teacher forcing; generates with `generate()` (greedy or beam search).
    """
)
class ClusterSTMForVideoCaptioning(ClusterSTMPreTrainedModel, GenerationMixin):
    config: ClusterSTMConfig
    # Generation starts from text (a [CLS] prompt); the video is a conditioning input.
    main_input_name = "input_ids"
    accepts_loss_kwargs = False
    _tied_weights_keys = {"mlm_head.decoder.weight": "clusterstm.text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        self.clusterstm = ClusterSTMModel(config)
        # Named as in `ClusterSTMForPreTraining`: the pretrained MLM head initialises the language-modelling head.
        self.mlm_head = ClusterSTMMLMHead(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.clusterstm.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.clusterstm.text_model.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.mlm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.mlm_head.decoder = new_embeddings

    def encode_videos(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None
    ) -> torch.Tensor:
        """The video tokens `(batch_size, num_tokens, hidden_size)` the decoder cross-attends to."""
        return self.clusterstm.vision_model(
            pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True
        ).last_hidden_state

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        video_embeds: torch.Tensor | None = None,
        video_attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMVideoCaptioningOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target tokens aligned with `input_ids` (usually `input_ids` with padding set to -100); position `t`
            is predicted from the tokens before it, so the first label is never predicted. -100 is ignored.
        video_embeds (`torch.FloatTensor` of shape `(batch_size, num_video_tokens, hidden_size)`, *optional*):
            Pre-computed video tokens ([`~ClusterSTMForVideoCaptioning.encode_videos`]); used instead of
            `pixel_values` (generation encodes the video once).
        video_attention_mask (`torch.Tensor` of shape `(batch_size, num_video_tokens)`, *optional*):
            Mask of the video tokens (1 = attend).
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit video token mask (`True` = dropped), see [`ClusterSTMVisionModel`].
        """
        if input_ids is None:
            raise ValueError("`input_ids` (the caption, starting with the [CLS] / bos token) is required.")
        if video_embeds is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` or pre-computed `video_embeds`.")
            video_embeds = self.encode_videos(pixel_values, bool_masked_pos=bool_masked_pos)
        if video_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"Got {video_embeds.shape[0]} videos for {input_ids.shape[0]} captions; pass one caption per video."
            )
        hidden_states = self.clusterstm.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=video_embeds,
            encoder_attention_mask=video_attention_mask,
            mode="multimodal",
            is_causal=True,
        ).last_hidden_state
        logits = self.mlm_head(hidden_states)

        loss = None
        if labels is not None:
            shifted_logits = logits[:, :-1].float()
            shifted_labels = labels[:, 1:].to(logits.device)
            token_losses = nn.functional.cross_entropy(
                shifted_logits.reshape(-1, shifted_logits.shape[-1]),
                shifted_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            loss = token_losses / (shifted_labels != -100).sum().clamp(min=1)
        return ClusterSTMVideoCaptioningOutput(loss=loss, logits=logits, video_embeds=video_embeds)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        video_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """Every step re-runs the decoder on the whole prefix (no key/value cache) against the cached video tokens."""
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "video_embeds": video_embeds,
            "video_attention_mask": video_attention_mask,
        }

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """
        Caption videos with [`~generation.GenerationMixin.generate`] (greedy, sampling or beam search with
        `num_beams > 1`).

        The video is encoded once; its tokens are expanded for the beams by `generate`. Decoding starts from
        `input_ids` (a prompt) or, by default, from the `bos_token_id` of the generation config (the tokenizer's
        [CLS]); it stops at `eos_token_id` ([SEP]).

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_frames, num_channels, height, width)`, *optional*):
                The videos (or pass `video_embeds`).
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*): A prompt.
            attention_mask (`torch.Tensor`, *optional*): Mask of the prompt.
            video_embeds (`torch.Tensor`, *optional*): Pre-computed video tokens.
            generate_kwargs: Any generation argument (`num_beams`, `max_new_tokens`, `do_sample`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, sequence_length)`, starting with the prompt.
        """
        if video_embeds is None:
            if pixel_values is None:
                raise ValueError("generate() needs `pixel_values` or `video_embeds`.")
            video_embeds = self.encode_videos(pixel_values)
        batch_size = video_embeds.shape[0]
        if input_ids is None:
            bos_token_id = self.generation_config.bos_token_id
            if bos_token_id is None:
                bos_token_id = getattr(self.config, "bos_token_id", None)
            if bos_token_id is None:
                raise ValueError(
                    "No `bos_token_id`: set `model.generation_config.bos_token_id` (the tokenizer's [CLS] id) or pass "
                    "a prompt as `input_ids`."
                )
            input_ids = torch.full((batch_size, 1), bos_token_id, dtype=torch.long, device=video_embeds.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # No key/value cache: prepare_inputs_for_generation feeds the whole prefix at every step.
        generate_kwargs["use_cache"] = False
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, video_embeds=video_embeds, **generate_kwargs
        )
