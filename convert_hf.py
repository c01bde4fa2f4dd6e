"""Convert checkpoints between this project and Hugging Face transformers' DeepSeek-V3 (DeepseekV3ForCausalLM).

    python convert_hf.py export --ckpt out/shakespeare/best.pt --out-dir hf_model
    python convert_hf.py import --hf-dir hf_model --out imported.pt

export writes a self-contained directory (EXPORT_FILES): model.safetensors and config.json, which
DeepseekV3ForCausalLM.from_pretrained(dir) loads with no missing or unexpected weights; GPT-2's tokenizer files,
generated offline from the BPE ranks (hf_tokenizer.py); generation_config.json; and README.md, a model card. With
them AutoTokenizer, AutoModelForCausalLM and pipeline("text-generation") load the directory offline. import reads
such a directory, including one written by transformers' save_pretrained, back into a checkpoint holding "model"
and "model_config" (train.py's, less the optimiser state), which test.py evaluates (with --data-dir) and samples
from. Only dense DeepSeek-V3 models convert (no mixture-of-experts layers, no multi-token-prediction layers; RoPE
plain or YaRN-scaled), and only MLA checkpoints export: DeepSeek-V3 has no MHA or GQA.

The two models compute the same logits (tests/test_convert_hf.py checks it against transformers 5.24.0); what
differs is only how they write things down:
- Weight names: DeepSeek's, the same as ours; transformers adds "model." to every name but lm_head.weight.
- RoPE pairs: ours rotates pairs (i, i + dr/2) of q_rope and k_rope. DeepSeek's checkpoints store each pair's two
  rows side by side, (2i, 2i + 1), which transformers reads when rope_interleave is true, its default. export
  reorders the RoPE rows of q_b_proj (or q_proj) and kv_a_proj_with_mqa into that layout and sets the flag;
  import reorders them back, or copies them when a directory says rope_interleave false.
- Tied embeddings: tie_word_embeddings; lm_head.weight is written all the same, a copy of the embedding, for
  readers that do not tie (vLLM's DeepSeek model; safetensors refuses one tensor under two names). transformers
  ties it again on load; import refuses a tied file whose lm_head.weight differs from the embedding.
- No query compression: q_lora_rank 0 here is null there (q_proj instead of q_a_proj / q_b_proj).
- RMSNorm eps: transformers builds q_a_layernorm and kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says, so
  only norm_eps 1e-6 (every preset's) converts exactly; others are refused.
- Softmax scale: both use (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times mscale(factor, mscale_all_dim)^2
  under YaRN, where mscale(s, m) = 0.1 m ln(s) + 1 (1 when mscale_all_dim is 0 or absent).
- YaRN: rope_parameters {"rope_type": "yarn", factor, original_max_position_embeddings, beta_fast, beta_slow,
  mscale, mscale_all_dim} (transformers 5), or the older rope_scaling {"type": "yarn", ...} beside a top-level
  rope_theta (DeepSeek's own config files; import only), is our rope_scaling "yarn" with rope_factor,
  original_seq_len, beta_fast, beta_slow, mscale, mscale_all_dim. Absent betas are 32 and 1, as in transformers.
  Where the implementations differ, this project follows transformers:
  * cos/sin attention factor: mscale(factor, mscale) / mscale(factor, mscale_all_dim) in transformers and
    DeepSeek-V2's modeling_deepseek.py alike when both are non-zero (1 for DeepSeek's released configs, V3's
    1.0/1.0 and V2-Lite's 0.707/0.707). With mscale_all_dim 0 or absent, transformers uses mscale(factor, 1) and
    ignores mscale, DeepSeek-V2's code uses mscale(factor, mscale): import reads such a file as transformers does
    (mscale 1), export refuses mscale != 1 with mscale_all_dim 0, and import refuses mscale_all_dim without mscale
    (transformers then mixes mscale(factor, 1) on cos/sin with the mscale_all_dim softmax correction).
  * DeepSeek-V3's reference inference code (inference/model.py) applies YaRN, and its softmax correction with
    its one mscale, only when it runs past original_seq_len, and scales no cos/sin; transformers and this project
    apply YaRN at every length once configured. For V3's released config (mscale = mscale_all_dim) the two agree
    whenever the reference applies YaRN.
  * Frequencies: transformers computes them in float32, this project in float64 rounded to float32 at the end;
    angles differ by about 1e-7 relative. An explicit attention_factor or truncate false is refused.
- Dense layers: first_k_dense_replace = num_hidden_layers makes every FFN the SwiGLU MLP (intermediate_size =
  ffn_hidden); n_routed_experts 0 and num_nextn_predict_layers 0 say there are no experts and no MTP layers, and
  every other expert field is written as "none" too (DENSE_FIELDS): DeepseekV3Config's defaults describe
  DeepSeek-V3's experts, and llama.cpp's converter copies them into the GGUF.
- Vocabulary: the padded vocab_size (50304) is exported as is; the ids past GPT-2's 50257 never come from the
  tokenizer. bos/eos_token_id name GPT-2's <|endoftext|> (50256) and tokenizer_note says which tokenizer this is.
  The tokenizer files are written when the vocabulary holds GPT-2's 50257 ids; a smaller one is not GPT-2's
  tokens (a test's byte-level model, say), and its export has no tokenizer.
- Generation: generation_config.json samples as test.py does by default (temperature, top-k), stops at and pads
  with <|endoftext|>, and suppresses the padding ids, which test.py never samples. It has no max_length: with
  one, every generate() call that passes max_new_tokens warns.
- Files are mode 0666 & ~umask, as the user's other files (fileio.atomic_write_all; safetensors alone makes 0600).
- Dropout: transformers has only attention dropout; export writes 0, import sets dropout 0 (pass your own when
  fine-tuning). block_size is max_position_embeddings.
"""
import json
from pathlib import Path

import torch

import hf_tokenizer
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cli import ArgumentParser, CLIError, run
from fileio import atomic_write_all, owned_directory, read_json, refuse_overwrite, regular_file, require
from model import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, RowBlock, Transformer
from model_card import model_card
from model_config import ModelConfig
from tokenizer import EOT_ID, VOCAB_SIZE, holds_gpt2_ids

HF_LATENT_NORM_EPS = 1e-6  # transformers' eps for q_a_layernorm and kv_a_layernorm, fixed
TOKENIZER_NOTE = ("GPT-2 BPE (tiktoken r50k_base, the same as Hugging Face's 'gpt2' tokenizer); "
                  "<|endoftext|> = 50256 separates documents; ids from 50257 up are vocabulary padding")
# Every DeepseekV3Config field that describes experts or multi-token prediction, as "none"; its defaults (in
# brackets) are DeepSeek-V3's, which a reader that goes by the config (llama.cpp's converter does) would take.
DENSE_FIELDS = {
    "n_routed_experts": 0,  # [256]
    "num_experts_per_tok": 0,  # [8]
    "n_group": 0,  # [8]
    "topk_group": 0,  # [4]
    "n_shared_experts": 0,  # [1]
    "moe_intermediate_size": 0,  # [2048]
    "routed_scaling_factor": 1.0,  # [2.5]
    "norm_topk_prob": False,  # [true]
    "num_nextn_predict_layers": 0,  # [1]
}
# transformers' DeepseekV3Config defaults, for the flags a config.json may leave out
HF_DEFAULTS = {"first_k_dense_replace": 3, "rope_interleave": True, "tie_word_embeddings": False,
               "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "rope_theta": 10000.0}
# The kind of every config.json field import reads (see HF_REQUIRED for those that must be there).
HF_FIELD_KINDS = {key: int for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                       "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                                       "first_k_dense_replace")}
HF_FIELD_KINDS |= {"rope_interleave": bool, "tie_word_embeddings": bool, "attention_bias": bool, "rms_norm_eps": float,
                   "rope_theta": float, "hidden_act": str, "rope_parameters": dict, "rope_scaling": dict}
YARN_FIELD_KINDS = {"factor": float, "original_max_position_embeddings": int, "beta_fast": float, "beta_slow": float,
                    "mscale": float, "mscale_all_dim": float, "rope_theta": float, "truncate": bool}
HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
               "max_position_embeddings")


def safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        raise CLIError("convert_hf.py needs safetensors: pip install -r requirements-dev.txt") from None
    return safetensors.torch


# ---- weights ------------------------------------------------------------------------------------

def interleave_order(dr: int) -> torch.Tensor:
    """(dr,) row order that turns half-split RoPE pairs (i, i + dr/2) into interleaved pairs (2i, 2i + 1):
    interleaved[j] = half_split[order[j]]."""
    return torch.arange(dr).view(2, dr // 2).t().reshape(-1)


def rope_row_order(blocks: list[RowBlock], to_interleaved: bool) -> torch.Tensor:
    """The order of a stacked weight's rows (its row blocks, from the model's stacked_rows) that writes every
    rotary block's half-split pairs as interleaved pairs, or with to_interleaved False reads them back; the
    other rows stay where they are."""
    pieces, start = [], 0
    for block in blocks:
        rows = torch.arange(start, start + block.rows)
        if block.rotary:
            order = interleave_order(block.rows)
            rows = rows[order if to_interleaved else order.argsort()]
        pieces.append(rows)
        start += block.rows
    return torch.cat(pieces)


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def to_hf_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, RoPE rows interleaved, float32; lm_head.weight always, a copy
    of the embedding when tied (safetensors refuses one tensor under two names)."""
    stacked = model.stacked_rows()
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            tensor = tensor.clone()
        if name in stacked:
            tensor = tensor[rope_row_order(stacked[name], to_interleaved=True)]
        weights[hf_name(name)] = tensor.float().contiguous()
    return weights


def from_hf_weights(hf_weights: dict[str, torch.Tensor], config: ModelConfig, interleaved: bool) -> dict:
    """A state dict for Transformer(config) from transformers' weights, checked name by name and shape by shape."""
    with torch.device("meta"):  # names and shapes only, no memory
        template = Transformer(config)
    stacked = template.stacked_rows() if interleaved else {}
    state = {}
    for name, expected in template.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        tensor = hf_weights.get(hf_name(name))
        if tensor is None:
            raise CLIError(f"the weights lack {hf_name(name)}")
        if tensor.shape != expected.shape:
            raise CLIError(f"{hf_name(name)} has shape {tuple(tensor.shape)}; "
                           f"config.json implies {tuple(expected.shape)}")
        if name in stacked:
            tensor = tensor[rope_row_order(stacked[name], to_interleaved=False)]
        state[name] = tensor.float().contiguous()
    if config.tie_embeddings:
        lm_head = hf_weights.get("lm_head.weight")
        if lm_head is not None and not torch.equal(lm_head.float(), state["embed_tokens.weight"]):
            raise CLIError("config.json ties the embeddings (tie_word_embeddings), but lm_head.weight is not "
                           "model.embed_tokens.weight: a reader that does not tie would compute other logits")
        state["lm_head.weight"] = state["embed_tokens.weight"]
    unexpected = sorted(set(hf_weights) - {hf_name(name) for name in template.state_dict()})
    if unexpected:
        raise CLIError(f"unexpected weights for a dense DeepSeek-V3 model: {', '.join(unexpected[:3])}"
                       f"{' ...' if len(unexpected) > 3 else ''}")
    return state


def load_hf_weights(hf_dir: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor in hf_dir/model.safetensors (save_pretrained writes one file up to 50 GB). Its header is read
    first, and a config whose weights could not be in the file (at one byte each) is refused before anything is
    loaded or built: a config.json of two million layers fails here at once."""
    st = safetensors_torch()
    path = regular_file(hf_dir / "model.safetensors", "weights file")
    try:
        with st.safe_open(path, framework="pt"):  # reads and checks the header only
            pass
        if config.num_params() > path.stat().st_size:
            raise CLIError(f"config.json describes {config.num_params():,} weights, more than the "
                           f"{path.stat().st_size:,} bytes of {path} can hold")
        return st.load_file(path)
    except CLIError:
        raise
    except Exception as err:  # safetensors reports a bad file as SafetensorError, OSError or ValueError
        raise CLIError(f"{path} is not a readable safetensors file ({type(err).__name__})") from None


# ---- config -------------------------------------------------------------------------------------

def to_hf_config(config: ModelConfig) -> dict:
    """config.json for DeepseekV3ForCausalLM: dense, interleaved RoPE rows, plain or YaRN RoPE."""
    eot = EOT_ID if EOT_ID < config.vocab_size else None  # transformers warns about special ids outside the vocab
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,  # keys and values are per head; fewer would make transformers repeat them
        "q_lora_rank": config.q_lora_rank or None,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": to_hf_rope(config),
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "first_k_dense_replace": config.n_layer,
        **DENSE_FIELDS,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": None,  # GPT-2 has no padding token
        "tokenizer_note": TOKENIZER_NOTE,
        "dtype": "float32",
    }


def to_hf_rope(config: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "yarn":
        if config.mscale_all_dim == 0 and config.mscale != 1:
            raise CLIError(f"mscale {config.mscale} with mscale_all_dim 0 does not export: transformers then "
                           "ignores mscale (see the notes in convert_hf.py)")
        rope |= {"rope_type": "yarn", "factor": config.rope_factor,
                 "original_max_position_embeddings": config.original_seq_len, "beta_fast": config.beta_fast,
                 "beta_slow": config.beta_slow, "mscale": config.mscale, "mscale_all_dim": config.mscale_all_dim}
    return rope


def from_hf_rope(rope: dict) -> dict:
    """Our RoPE scaling fields from rope_parameters (or the older rope_scaling), read as transformers reads them."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type != "yarn":
        raise CLIError(f"RoPE scaling {rope_type!r} is not supported: only yarn converts")
    missing = [key for key in ("factor", "original_max_position_embeddings") if rope.get(key) is None]
    if missing:
        raise CLIError(f"RoPE scaling 'yarn' needs {' and '.join(missing)} in config.json")
    for key, kind in YARN_FIELD_KINDS.items():
        if rope.get(key) is not None:
            require(rope[key], kind, f"config.json: rope {key}")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
        raise CLIError("RoPE scaling 'yarn' with an explicit attention_factor or truncate false does not convert: "
                       "this project derives them as DeepSeek does")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        raise CLIError("RoPE scaling 'yarn' with mscale_all_dim but no mscale does not convert: transformers and "
                       "DeepSeek's code compute different attention factors for it")
    return {"rope_scaling": "yarn", "rope_factor": float(rope["factor"]),
            "original_seq_len": rope["original_max_position_embeddings"],
            "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1),
            "mscale": float(mscale) if mscale_all_dim else 1.0, "mscale_all_dim": float(mscale_all_dim or 0)}


def from_hf_config(hf: dict) -> tuple[ModelConfig, bool]:
    """Our ModelConfig from a DeepSeek-V3 config.json, and whether its RoPE rows are interleaved.
    Refuses what this project's model cannot compute the same way."""
    if hf.get("model_type") != "deepseek_v3":
        raise CLIError(f"config.json has model_type {hf.get('model_type')!r}, not 'deepseek_v3'")
    missing = [key for key in HF_REQUIRED if key not in hf]
    if missing:
        raise CLIError(f"config.json lacks {', '.join(missing)}")
    hf = {**HF_DEFAULTS, **hf}
    for key, kind in HF_FIELD_KINDS.items():
        if not (key == "q_lora_rank" and hf[key] is None or key in ("rope_parameters", "rope_scaling")
                and hf.get(key) is None):
            require(hf[key], kind, f"config.json: {key}")
    dense = hf["first_k_dense_replace"]
    if dense < hf["num_hidden_layers"]:
        raise CLIError(f"this DeepSeek-V3 model has mixture-of-experts layers (first_k_dense_replace {dense} < "
                       f"num_hidden_layers {hf['num_hidden_layers']}); only dense models convert")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers >= 5, or older config files
    if hf["hidden_act"] != "silu" or hf["attention_bias"]:
        raise CLIError(f"only SwiGLU (hidden_act silu) without attention biases converts; got hidden_act "
                       f"{hf['hidden_act']!r}, attention_bias {hf['attention_bias']}")
    if hf["rms_norm_eps"] != HF_LATENT_NORM_EPS:
        raise CLIError(f"rms_norm_eps is {hf['rms_norm_eps']}, but transformers uses {HF_LATENT_NORM_EPS} in "
                       f"q_a_layernorm and kv_a_layernorm; this project's model has one eps for every norm")
    try:
        config = ModelConfig(
            vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
            d_model=hf["hidden_size"], n_head=hf["num_attention_heads"], attention="mla",
            q_lora_rank=hf["q_lora_rank"] or 0, kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], rope_theta=float(rope.get("rope_theta", hf["rope_theta"])),
            ffn_hidden=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"], dropout=0.0,
            tie_embeddings=bool(hf["tie_word_embeddings"]), **from_hf_rope(rope))
    except (TypeError, ValueError) as err:
        raise CLIError(f"config.json: {err}") from None
    return config, bool(hf["rope_interleave"])


# ---- the directory's other files ----------------------------------------------------------------

def to_generation_config(config: ModelConfig) -> dict:
    """generation_config.json: test.py's sampling defaults, <|endoftext|> to stop and to pad, and the vocabulary's
    padding ids suppressed. No max_length: transformers then makes 20 new tokens unless told, and a call that
    passes max_new_tokens does not warn that both are set."""
    generation = {"do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K}
    if holds_gpt2_ids(config.vocab_size):
        generation |= {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}
    if config.vocab_size > VOCAB_SIZE:
        generation["suppress_tokens"] = list(range(VOCAB_SIZE, config.vocab_size))
    return generation


def json_text(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"


def export_texts(ckpt: dict, config: ModelConfig, ckpt_path) -> dict[str, str]:
    """Every file of the export but the weights, by name, in EXPORT_FILES' order (config.json last)."""
    texts = hf_tokenizer.tokenizer_files(config.block_size) if holds_gpt2_ids(config.vocab_size) else {}
    return {**texts, "generation_config.json": json_text(to_generation_config(config)),
            "README.md": model_card(ckpt, config, ckpt_path), "config.json": json_text(to_hf_config(config))}


# ---- the two directions -------------------------------------------------------------------------

# What export writes, in the order the files are renamed into place: config.json last, so that its presence says
# the set is complete.
EXPORT_FILES = ("model.safetensors", *hf_tokenizer.FILES, "generation_config.json", "README.md", "config.json")


def export_checkpoint(ckpt_path, out_dir, force: bool = False) -> list[str]:
    """Project checkpoint -> a self-contained Hugging Face directory out_dir (EXPORT_FILES; the tokenizer files
    only for a vocabulary that holds GPT-2's ids) -> the names of the files written. Other files in out_dir are
    left alone; one process at a time writes into out_dir."""
    out_dir = Path(out_dir)
    refuse_overwrite(out_dir, EXPORT_FILES, force, "an export")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    if model.config.attention != "mla":
        raise CLIError(f"{ckpt_path} has {model.config.attention} attention; "
                       "only MLA checkpoints export as DeepSeek-V3")
    if model.config.norm_eps != HF_LATENT_NORM_EPS:
        raise CLIError(f"norm_eps is {model.config.norm_eps}, but transformers' DeepSeek-V3 always uses "
                       f"{HF_LATENT_NORM_EPS} in q_a_layernorm and kv_a_layernorm: its logits would differ")
    st = safetensors_torch()
    weights, texts = to_hf_weights(model), export_texts(ckpt, model.config, ckpt_path)
    names = ["model.safetensors", *texts]
    with owned_directory(out_dir, "an export"):
        refuse_overwrite(out_dir, EXPORT_FILES, force, "an export")  # again, now that no one else writes here
        with atomic_write_all([out_dir / name for name in names]) as temps:
            st.save_file(weights, temps[0], metadata={"format": "pt"})
            for tmp, text in zip(temps[1:], texts.values()):
                tmp.write_text(text, encoding="utf-8")
            # All written. The old config.json goes first, so that new weights are never seen beside it, and so
            # do an earlier export's files that this one does not write (a GPT-2 tokenizer, for a small vocabulary).
            for name in ("config.json", *(name for name in EXPORT_FILES if name not in names)):
                (out_dir / name).unlink(missing_ok=True)
    return names


def import_checkpoint(hf_dir, out_path, force: bool = False) -> None:
    """A DeepSeek-V3 directory -> a project checkpoint {"model", "model_config"} at out_path."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    refuse_overwrite(out_path.parent, [out_path.name], force, "a checkpoint")
    if not hf_dir.is_dir():
        raise CLIError(f"{hf_dir} is not a directory")
    inputs = [hf_dir / "model.safetensors", hf_dir / "config.json"]
    if out_path.exists() and any(out_path.resolve() == path.resolve() for path in inputs if path.exists()):
        raise CLIError(f"--out {out_path} is one of the files import reads; choose another path")
    config, interleaved = from_hf_config(read_json(hf_dir / "config.json"))
    state = from_hf_weights(load_hf_weights(hf_dir, config), config, interleaved)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": state, "model_config": config.to_dict()}, out_path)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="project checkpoint -> Hugging Face DeepSeek-V3 directory")
    export.add_argument("--ckpt", required=True, help="project checkpoint (.pt) of an MLA model")
    export.add_argument("--out-dir", required=True, help="directory to write the model, its config, tokenizer and "
                        "model card to (created if missing; other files in it are left alone)")
    imp = commands.add_parser("import", help="Hugging Face DeepSeek-V3 directory -> project checkpoint")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and model.safetensors")
    imp.add_argument("--out", required=True, help="checkpoint file to write")
    for sub in (export, imp):
        sub.add_argument("--force", action="store_true", help="replace the files this command writes if they exist "
                                                              "(never any other file)")
    args = parser.parse_args(argv)
    if args.command == "export":
        names = export_checkpoint(args.ckpt, args.out_dir, args.force)
        print(f"wrote {args.out_dir}: {', '.join(names)}")
    else:
        import_checkpoint(args.hf_dir, args.out, args.force)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main, memory_hint="this model does not fit in memory here")
