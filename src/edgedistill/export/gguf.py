"""Hugging Face folder → GGUF for llama.cpp (and Ollama, LM Studio, mobile apps built on it).

Why our own writer: the `gguf` package ships the file format (GGUFWriter, tensor-name map,
quantisers) but no Hugging Face converter, and the converter vendored with llama.cpp
bindings does not run against the PyPI `gguf` release. The rules follow llama.cpp's
convert_hf_to_gguf.py, re-stated here:

- Llama-family q/k weights are re-ordered per head from Hugging Face's rotate-half layout
  (dimension i pairs with i + d/2) to llama.cpp's interleaved pairs (2i, 2i+1); Qwen2 uses
  llama.cpp's NEOX rope and is written as it is, q/k/v biases included.
- Tied embeddings: no `output.weight`; llama.cpp reuses `token_embd`.
- GPT-2 style byte-level BPE vocabularies (SmolLM2, Qwen2, Llama 3): tokens, merges, token
  types (control for special added tokens), and the pre-tokenizer name that makes llama.cpp
  split text the way the Hugging Face tokenizer does; SentencePiece-style BPE with byte
  fallback (Llama 2, Mistral): llama.cpp's "llama" vocabulary with scores from the merge
  order. Both with bos/eos/unk/pad ids and the chat template — checked after export.

The file is written next to its destination and renamed at the end: a crash or a bad input
never leaves half a GGUF.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edgedistill import __version__
from edgedistill.errors import UserError
from edgedistill.export.quantize import EXPORT_TYPES, Q, encode, tensor_type
from edgedistill.run import publish_mode

ARCHITECTURES = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
                 "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2}
PERMUTES_QK = {gguf.MODEL_ARCH.LLAMA}


@dataclass
class ExportResult:
    path: Path
    export_type: str
    size_bytes: int
    parameters: int
    bits_per_weight: float
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensors


def permute_qk(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, rows [x0..x(d/2-1), y0..y(d/2-1)] → [x0, y0, x1, y1, ...] (weights or biases)."""
    head_dim = weights.shape[0] // n_heads
    return weights.reshape(n_heads, 2, head_dim // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing — the model folder needs it for a GGUF export")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None


def architecture(config: dict, where: Path) -> gguf.MODEL_ARCH:
    name = (config.get("architectures") or ["?"])[0]
    if name not in ARCHITECTURES:
        raise UserError(f"{where}: architecture '{name}' has no GGUF writer here (supported: "
                        f"{', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]


def pre_tokenizer_name(tokenizer_json: dict, model_type: str) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex inside ByteLevel: llama.cpp's "gpt-2" is the same split
    if model_type in ("qwen2", "qwen3"):
        return "qwen2"
    text = json.dumps(pre)
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    return "default"


def _chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path, model_type: str, vocab_size: int) -> None:
    """Vocabulary, merges or scores, token types, special ids and the chat template."""
    from transformers import AutoTokenizer

    _read_json(folder / "tokenizer.json")  # present and readable, or one clear line
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        # The tokenizer as transformers runs it (for some model types it rebuilds the pre-tokenizer
        # from its own class, not from tokenizer.json): that is what the student was trained with.
        tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    except (ValueError, OSError, AttributeError) as exc:
        raise UserError(f"{folder}: cannot load the tokenizer ({exc})") from None
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{folder / 'tokenizer.json'}: a {model.get('type')} vocabulary — the GGUF writer handles "
                        "BPE ones (GPT-2 style byte-level, and SentencePiece-style with byte fallback)")
    if model.get("byte_fallback"):
        _sentencepiece_vocabulary(writer, tokenizer_json, vocab_size)
    else:
        _byte_level_vocabulary(writer, tokenizer_json, model_type, vocab_size)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                           writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    tokenizer_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    template = _chat_template(folder, tokenizer_config)
    if template:
        writer.add_chat_template(template)


def _token_table(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], dict[str, int]]:
    """Tokens by id (model vocabulary + added tokens; rows beyond the tokenizer padded) and types."""
    vocab: dict[str, int] = dict(tokenizer_json["model"]["vocab"])
    added = {entry["id"]: entry for entry in tokenizer_json.get("added_tokens", [])}
    for idx, entry in added.items():
        vocab[entry["content"]] = idx
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]  # embedding rows beyond the tokenizer
    types = [int(gguf.TokenType.UNUSED)] * size
    for token, idx in vocab.items():
        tokens[idx] = token
        types[idx] = int(gguf.TokenType.NORMAL)
    for idx, entry in added.items():
        types[idx] = int(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
    return tokens, types, vocab


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _byte_level_vocabulary(writer: gguf.GGUFWriter, tokenizer_json: dict, model_type: str, vocab_size: int) -> None:
    tokens, types, _ = _token_table(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json, model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges := _merges(tokenizer_json["model"]):
        writer.add_token_merges(merges)


def _sentencepiece_vocabulary(writer: gguf.GGUFWriter, tokenizer_json: dict, vocab_size: int) -> None:
    """SentencePiece-style BPE with byte fallback (Llama 2, Mistral, TinyLlama), as llama.cpp's
    "llama" vocabulary. llama.cpp merges the adjacent pair whose concatenation has the highest
    score, so a token made by merge number r scores -r: the same order the Hugging Face BPE
    applies its merges in (checked token for token in the parity test)."""
    tokens, types, vocab = _token_table(tokenizer_json, vocab_size)
    rank: dict[str, int] = {}
    for number, merge in enumerate(_merges(tokenizer_json["model"])):
        rank.setdefault(merge.replace(" ", ""), number)
    scores = [-float(rank[token]) if token in rank else 0.0 for token in tokens]
    for token, idx in vocab.items():
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[idx] = int(gguf.TokenType.BYTE)
    unk = tokenizer_json["model"].get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = int(gguf.TokenType.UNKNOWN)
    normalizer = json.dumps(tokenizer_json.get("normalizer") or {}) + json.dumps(tokenizer_json.get("pre_tokenizer") or {})
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix('"Prepend"' in normalizer or '"prepend_scheme": "first"' in normalizer
                                or '"prepend_scheme": "always"' in normalizer)


def _hyperparameters(writer: gguf.GGUFWriter, config: dict) -> None:
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if rope.get("rope_type", "default") not in ("default", None):
        raise UserError(f"rope_type '{rope['rope_type']}' is not written to GGUF yet")


def _state_dict(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights to export")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            tensors |= load_file(file)
        except Exception as exc:  # safetensors raises its own error types
            raise UserError(f"{file}: cannot read the weights ({exc})") from None
    return tensors


def _as_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint16:  # safetensors' numpy view of bfloat16
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def export_gguf(folder: Path, destination: Path, export_type: str, *, name: str,
                metadata: dict[str, str] | None = None, embeddings_type: str = "q8_0") -> ExportResult:
    """Write `destination` (.gguf) from a Hugging Face model folder; return what was written."""
    if export_type not in EXPORT_TYPES:
        raise UserError(f"export type '{export_type}' is not one of {', '.join(EXPORT_TYPES)}")
    config = _read_json(folder / "config.json")
    arch = architecture(config, folder / "config.json")
    tensors = _state_dict(folder)
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    names = gguf.get_tensor_name_map(arch, n_layers)
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors
    embed_q = EXPORT_TYPES[embeddings_type][0]

    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(name)
        writer.add_file_type(int(EXPORT_TYPES[export_type][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in {"edgedistill.version": __version__, **(metadata or {})}.items():
            if key == "general.license":
                writer.add_license(value)
            elif value:
                writer.add_string(key, value)
        _hyperparameters(writer, config)
        write_tokenizer(writer, folder, config.get("model_type", ""), config["vocab_size"])
        counts: dict[str, int] = {}
        parameters = tensor_bytes = 0
        for hf_name in sorted(tensors):
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"{folder}: tensor '{hf_name}' has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
            weights = _as_float32(tensors[hf_name])
            if arch in PERMUTES_QK and ".q_proj." in hf_name:
                weights = permute_qk(weights, n_heads)
            elif arch in PERMUTES_QK and ".k_proj." in hf_name:
                weights = permute_qk(weights, n_kv)
            qtype = tensor_type(gguf_name, weights.shape, export_type, n_layers, embed_q)
            data = encode(weights, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            parameters += weights.size
            tensor_bytes += data.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        publish_mode(tmp)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Bits per weight from the tensor bytes alone (the vocabulary and metadata are not weights).
    return ExportResult(destination, export_type, destination.stat().st_size, parameters,
                        tensor_bytes * 8 / parameters, counts)
