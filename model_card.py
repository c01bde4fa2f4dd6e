"""The README.md an export carries (a Hugging Face model card): what the model is, its config, how it was trained
(from what train.py saved in the checkpoint), how to load it offline, and how far other engines take it."""
import textwrap
from pathlib import Path

from model import DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from model_config import ModelConfig
from report import markdown_table
from tokenizer import EOT_ID, VOCAB_SIZE, holds_gpt2_ids
from training import TrainConfig, saved_train_config


def model_card(ckpt: dict, config: ModelConfig, ckpt_path) -> str:
    """README.md: what the model is, its config, how it was trained, how to load it offline, and how far other
    engines take it."""
    ckpt_path = Path(ckpt_path)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [deepseek_v3, mla, multi-head-latent-attention]
---
# {ckpt_path.parent.name}/{ckpt_path.name}: a GPT-style language model with Multi-Head Latent Attention

A decoder-only language model whose attention is DeepSeek-V2's Multi-Head Latent Attention (MLA), exported from
the checkpoint `{ckpt_path}` to transformers' DeepSeek-V3 format (`DeepseekV3ForCausalLM`): dense (every layer's
FFN is a SwiGLU MLP; no experts, no multi-token prediction), float32 weights.

## Config

{markdown_table(["field", "value"], card_config_rows(config))}
## Training

{card_training(ckpt, config)}

## Loading

{card_loading(config)}

## Other engines

- llama.cpp: its `convert_hf_to_gguf.py` converts this directory to a `deepseek2` GGUF, which llama.cpp runs on
  its MLA path. A model without query compression (`q_lora_rank` null), or with YaRN whose `mscale` differs from
  `mscale_all_dim`, needs GGUF metadata the converter does not write; the exporting project's
  `benchmarks/llama_cpp.py` adds it and checks the logits against the original model.
- vLLM: `lm_head.weight` is in the file, as vLLM's DeepSeek model does not tie it to the embedding. Its MLA
  kernels take a latent of kv_lora_rank + qk_rope_head_dim = 512 + 64 (CPU, and most GPU kernels) or 256 + 64
  (its generic GPU path); this model's is {config.kv_lora_rank} + {config.qk_rope_head_dim}.
"""


def card_config_rows(config: ModelConfig) -> list[list[str]]:
    q = f"{config.q_lora_rank}" if config.q_lora_rank else "none (q_proj)"
    rope = f"theta {config.rope_theta:g}"
    if config.rope_scaling == "yarn":
        rope += (f", YaRN x{config.rope_factor:g} of {config.original_seq_len} (mscale {config.mscale:g}, "
                 f"mscale_all_dim {config.mscale_all_dim:g})")
    rows = [("layers", config.n_layer), ("width", config.d_model), ("heads", config.n_head), ("q_lora_rank", q),
            ("kv_lora_rank", config.kv_lora_rank),
            ("head dims: nope / rope / v", f"{config.qk_nope_head_dim} / {config.qk_rope_head_dim} / "
                                           f"{config.v_head_dim}"),
            ("SwiGLU FFN width", config.ffn_hidden), ("context (tokens)", config.block_size), ("RoPE", rope),
            ("vocabulary", config.vocab_size), ("tied embeddings", config.tie_embeddings),
            ("parameters", f"{config.num_params():,}"),
            ("KV cache per token", f"{config.kv_lora_rank} + {config.qk_rope_head_dim} values per layer")]
    return [[name, f"{value}"] for name, value in rows]


def card_training(ckpt: dict, config: ModelConfig) -> str:
    """How the checkpoint was trained, from what train.py saved in it."""
    if "train_config" not in ckpt or "step" not in ckpt:
        return "The checkpoint records no training run (random weights, or weights imported from elsewhere)."
    try:
        tc = TrainConfig(**saved_train_config(ckpt))
    except (TypeError, ValueError) as err:
        return f"The checkpoint's train_config cannot be read ({err})."
    schedule, start = tc.schedule, f", starting from `{tc.init_from}`" if tc.init_from else ""
    text = (f"Trained by the exporting project's train.py for {ckpt['step']} steps ({ckpt.get('tokens_seen', 0):,} "
            f"tokens) on `{tc.data_dir}`{start}: {tc.optimizer} at peak lr {schedule.peak:g} (warmup "
            f"{schedule.warmup} steps, cosine to {schedule.floor:g} at step {schedule.decay_end}), weight decay "
            f"{tc.weight_decay:g}, {tc.batch_size} x {tc.grad_accum} sequences of {config.block_size} tokens per "
            f"step, dropout {config.dropout:g}, seed {tc.seed}. Best validation loss "
            f"{ckpt.get('best_val_loss', float('nan')):.4f} nats/token (train.py's estimate on {tc.eval_iters} "
            f"batches, every {tc.eval_interval} steps).")
    return textwrap.fill(text, width=116)


def card_loading(config: ModelConfig) -> str:
    if not holds_gpt2_ids(config.vocab_size):
        return (f"`AutoModelForCausalLM.from_pretrained(\"DIR\")` loads it. There is no tokenizer: the vocabulary "
                f"of {config.vocab_size} ids is smaller than GPT-2's {VOCAB_SIZE}, so they are not GPT-2's tokens.")
    return f"""Everything is in this directory, GPT-2's tokenizer included; `HF_HUB_OFFLINE=1` makes sure nothing is
fetched.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
tokenizer = AutoTokenizer.from_pretrained("DIR")
model = AutoModelForCausalLM.from_pretrained("DIR")
generate = pipeline("text-generation", model="DIR")
print(generate("ROMEO:", max_new_tokens=50, do_sample=False)[0]["generated_text"])  # greedy
```

`generate()` samples at temperature {DEFAULT_TEMPERATURE:g} with top-k {DEFAULT_TOP_K} unless told otherwise,
stops at `<|endoftext|>` (id {EOT_ID}) and never produces the vocabulary's padding ids. Keep the prompt and the new
tokens within {config.block_size}, the context the model takes: transformers does not stop there (the pipeline
makes 256 new tokens unless told).

`<|endoftext|>` written in a prompt is read by this tokenizer as the special token {EOT_ID}, where the exporting
project's own tokenizer reads it as plain text; pass `split_special_tokens=True` to read it as plain text here."""
