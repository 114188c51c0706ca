"""A small causal language model built from DLA blocks, following Hugging Face conventions
(``PretrainedConfig``, ``PreTrainedModel``, ``GenerationMixin``; checkpoints in safetensors).

Generation carries the per-layer DLA caches under the model keyword ``dla_cache`` (a list of
``LayerCache``): constant memory per token, whatever the context length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .layers import DLABlock, DLAMixer, LayerCache, RMSNorm


class DLAConfig(PretrainedConfig):
    model_type = "dla"

    def __init__(self, vocab_size: int = 256, hidden_size: int = 128, num_hidden_layers: int = 2,
                 num_heads: int = 2, head_dim: Optional[int] = None, head_v_dim: Optional[int] = None,
                 intermediate_size: Optional[int] = None, mixer_base: str = "gla", capacity: int = 8,
                 tau: float = 0.6, conv_size: int = 4, rms_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, use_cache: bool = True, tie_word_embeddings: bool = True,
                 merge_policy: str = "dla", policy_block: Optional[int] = None, decay_init: str = "mamba2",
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        self.head_v_dim = head_v_dim if head_v_dim is not None else self.head_dim
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.mixer_base = mixer_base
        self.capacity = capacity
        self.tau = tau
        self.conv_size = conv_size
        # "dla" (information-aware); for comparisons a fixed policy of dla_ops.policies, or "softmax"
        # (causal softmax attention on the same projections, q and k not L2-normalised)
        self.merge_policy = merge_policy
        self.policy_block = policy_block
        # "mamba2" (random per head) or "spread" (log-spaced per head): layers.DECAY_INITS
        self.decay_init = decay_init
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


@dataclass
class DLACausalLMOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    dla_cache: Optional[list] = None


class DLAPreTrainedModel(PreTrainedModel):
    config_class = DLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["DLABlock"]
    _is_stateful = True

    def _init_weights(self, module):
        # transformers' init functions leave parameters loaded from a checkpoint alone
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        if isinstance(module, DLAMixer):   # after its Linear children: lam starts at exactly 1
            module.reset_dla_parameters(copy_=init.copy_)


class DLAModel(DLAPreTrainedModel):
    def __init__(self, config: DLAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DLABlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                dla_cache: Optional[list[LayerCache]] = None, use_cache: bool = False):
        x = self.embed_tokens(input_ids)
        new_cache = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            x, c = layer(x, attention_mask, None if dla_cache is None else dla_cache[i], use_cache)
            if use_cache:
                new_cache.append(c)
        return self.norm(x), new_cache


class DLAForCausalLM(DLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DLAConfig):
        super().__init__(config)
        self.model = DLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                dla_cache: Optional[list[LayerCache]] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, return_dict: bool = True,
                **kwargs) -> DLACausalLMOutput:
        """labels: [B, T] token ids, -100 to ignore; shifted inside (labels = input_ids works)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
        hidden, new_cache = self.model(input_ids, attention_mask, dla_cache, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return DLACausalLMOutput(loss=loss, logits=logits, dla_cache=new_cache)

    # --- generation: the DLA caches travel as the `dla_cache` model keyword ---------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # generate must not build a key/value cache: the DLA cache comes from forward

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, dla_cache=None,
                                      use_cache=None, **kwargs):
        if dla_cache is not None:   # one new token against the cache; padding is already absorbed
            return dict(input_ids=input_ids[:, -1:], dla_cache=dla_cache, use_cache=use_cache)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        return dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["dla_cache"] = outputs.dla_cache
        return model_kwargs
