"""
transformers' native `nanochat` architecture plus the two additions our GPT can be trained with: value
embeddings and x0 mixing. scripts/export_hf.py ships this file next to the weights of a model that uses
either, and config.json's auto_map points at it, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

runs it. (trust_remote_code: transformers imports and runs this file; read it first, it is short.) A model
trained without them exports to the native architecture and needs no file at all.

Everything else (rotary in the rotate-half layout with base 10000, QK-norm after rotary, parameter-free
RMSNorm on the embedding, before every block and before the head, ReLU^2, untied head, logit softcap 15,
GQA) is transformers' own NanoChat code, reused by subclassing. What is added, as in nanochat/gpt.py:

- value embeddings (ResFormer): the layers in config.value_embed_layers add a per-token embedding to their
  attention values, v = v_proj(x) + value_embed(token), before the heads attend;
- x0 mixing (config.x0_mixing): layer i reads resid_lambda * x + x0_lambda * x0 instead of x, where x0 is
  the normalised token embedding, with two learned scalars per layer.
"""
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
from transformers.models.nanochat.modeling_nanochat import (NanoChatAttention, NanoChatDecoderLayer, NanoChatForCausalLM,
                                                            NanoChatModel, apply_rotary_pos_emb, eager_attention_forward)


class NanoChatPlusConfig(NanoChatConfig):
    # its own model type: without trust_remote_code transformers refuses the model instead of silently
    # loading it as plain nanochat and dropping the value embeddings
    model_type = "nanochat_plus"
    value_embed_layers: list[int] | None = None  # which layers' attention values get a token embedding
    x0_mixing: bool = False


class NanoChatPlusAttention(NanoChatAttention):
    """transformers' NanoChat attention, with this layer's value embedding added to v."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        has_value_embed = layer_idx in (config.value_embed_layers or [])
        kv_dim = config.num_key_value_heads * self.head_dim
        self.value_embed = nn.Embedding(config.vocab_size, kv_dim) if has_value_embed else None

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, token_ids=None, **kwargs):
        # the parent's forward, with the value embedding added to v (the one line it cannot be told to do)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        if self.value_embed is not None:
            v = v + self.value_embed(token_ids).to(v.dtype)
        q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        q, k = self.q_norm(q), self.k_norm(k)  # rotary first, then QK-norm, as nanochat does
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                                    scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class NanoChatPlusDecoderLayer(NanoChatDecoderLayer):
    """transformers' NanoChat block, reading a learned mix of its input and x0 when x0 mixing is on."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = NanoChatPlusAttention(config, layer_idx)
        self.x0_mixing = config.x0_mixing
        if self.x0_mixing:
            self.resid_lambda = nn.Parameter(torch.ones(()))
            self.x0_lambda = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states, x0=None, **kwargs):
        if self.x0_mixing:
            hidden_states = self.resid_lambda * hidden_states + self.x0_lambda * x0
        return super().forward(hidden_states, **kwargs)


class NanoChatPlusModel(NanoChatModel):
    config_class = NanoChatPlusConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([NanoChatPlusDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if input_ids is None:
            raise ValueError("nanochat_plus needs input_ids (not inputs_embeds): the value embeddings look up tokens")
        inputs_embeds = self.embed_tokens(input_ids)
        # the parent's forward hands extra keyword arguments to every layer: x0 reaches the blocks, token_ids the attention
        return super().forward(inputs_embeds=inputs_embeds, x0=self.norm(inputs_embeds), token_ids=input_ids, **kwargs)


class NanoChatPlusForCausalLM(NanoChatForCausalLM):
    config_class = NanoChatPlusConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = NanoChatPlusModel(config)
        self.post_init()
