"""The student as an ExecuTorch program (.pte) for phones: XNNPACK-delegated, a static KV cache
(one token per call, as ExecuTorch's LLM runner drives it), fp32 or 8da4w, with the runner's
metadata inside — and the same checks as a GGUF, run in ExecuTorch's own runtime.

The path (transformers' own ExecuTorch integration, no optimum-executorch: its 1.1.0 pins
transformers 5.0.0rc1): `TorchExportableModuleForDecoderOnlyLM` (static cache) →
`torch.export` (strict: non-strict lifts the caches as constants and lowering then fails) →
`to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()], constant_methods=metadata)` →
`to_executorch`. Measured on six families (llama, mistral, qwen2, qwen3, phi3, gemma3): the fp32
program gives the eager logits within 1e-5 (gemma3 1e-3).

8da4w is torchao's int8 dynamic per-token activations × int4 weights in groups of 32 on every
linear, with the token embedding 4-bit too (weight-only): the recipe of ExecuTorch's own
`export_llm`. Three things make the quantized embedding lower (all hit here): the embedding's
`padding_idx` is dropped (ExecuTorch's quant fusion only matches `embedding(w, ids)`),
`do_quant_fusion_and_const_prop` turns it into `quantized_decomposed::embedding_4bit`, and
`executorch.kernels.quantized` registers that kernel, before `to_executorch` and before a
program that uses it is loaded.

`PteClient` answers the requests `export/verify.py` sends to llama.cpp's server (`/tokenize`,
`/apply-template`, `/completion` with top log-probs and timings) from a loaded .pte, so a .pte
goes through exactly the parity, KL and speed checks a GGUF does — one implementation of each.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgedistill.errors import UserError
from edgedistill.run import publish_mode

PTE_EXTRA_HINT = "pip install 'edgedistill[pte]' (or `make setup`)"
# Files ExecuTorch's LLM runner and an app need beside the .pte: the runner reads tokenizer.json
# from the folder it is given (and its BOS from tokenizer_config.json: given the bare file, the
# C++ tokenizer reports BOS = EOS = 0); the chat template is for the app, the runner has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def check_executorch() -> None:
    """One line, before any work, when the optional ExecuTorch packages are missing."""
    missing = [name for name in ("executorch", "torchao", "pytorch_tokenizers") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"export.formats has 'pte' but {', '.join(missing)} is not installed — {PTE_EXTRA_HINT}, "
                        "or drop 'pte' from export.formats")


@dataclass
class PteResult:
    path: Path
    pte_type: str
    size_bytes: int
    parameters: int
    max_seq_len: int
    attention: str  # "executorch_sdpa" (ExecuTorch's KV-cache ops) or "transformers_static_cache"
    export_s: float  # torch.export, wall clock
    lower_s: float  # to_edge_transform_and_lower + to_executorch, wall clock
    cpu_s: float  # both, CPU time of this process: single-threaded Python, the wall time of an idle machine
    delegated_partitions: int
    portable_ops: list[str]  # what stayed outside XNNPACK (runs on ExecuTorch's portable kernels)
    prepare_s: float  # loading the model, choosing its attention path, quantizing
    write_s: float  # serializing the program to disk


def runner_metadata(model, tokenizer, max_seq_len: int) -> dict[str, int | bool | list[int]]:
    """The constant methods ExecuTorch's LLM runner reads (extension/llm/runner/constants.h).
    The 1.5.1 runner requires get_max_seq_len, and takes its end-of-sequence ids from
    get_eos_ids over the tokenizer's (BOS and the vocabulary size it takes from the tokenizer)."""
    from edgedistill.models.hf import end_of_turn_ids

    return {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
            "get_vocab_size": int(model.config.get_text_config().vocab_size),
            "get_bos_id": int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id),
            "get_eos_ids": sorted(end_of_turn_ids(model, tokenizer)),
            "use_kv_cache": True, "use_sdpa_with_kv_cache": False, "enable_dynamic_shape": False}


def quantize_8da4w(model, group_size: int = 32) -> None:
    """In place: int8 dynamic activations × int4 grouped weights on the linears whose input splits
    into groups, int4 grouped weight-only on the token embedding (lm_head untied first, so the
    embedding and the output matrix each get their own scheme)."""
    import torch
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup

    embedding = model.get_input_embeddings()
    embedding.padding_idx = None  # inference-neutral; ExecuTorch's fusion pattern has no padding_idx
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Embedding) and m.embedding_dim % group_size == 0)
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features % group_size == 0)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


ATTENTION = "edgedistill_executorch"  # the name our attention function is registered under in transformers


def _runner_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function on ExecuTorch's own LLM ops: write this call's keys and
    values into the layer's cache at its start position (llama::update_cache), then attend over
    the filled prefix only (llama::custom_sdpa, causal, grouped-query heads inside) — where
    transformers' static cache attends over all max_seq_len slots under a mask. The same ops as
    ExecuTorch's own LLM export; they cut the traced graph by a fifth (lowering time with it).
    query (B, H, T, D), key/value (B, Hkv, T, D) → (B, T, H, D)."""
    import torch

    start = kwargs["position_ids"][0, 0].item()
    torch._check(start >= 0)
    torch._check(start < module.et_key_cache.size(1))
    torch.ops.llama.update_cache(key.transpose(1, 2), module.et_key_cache, start)
    torch.ops.llama.update_cache(value.transpose(1, 2), module.et_value_cache, start)
    out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), module.et_key_cache, module.et_value_cache, start,
                                      None, 0.0, True, scaling)
    return out, None


def _full_attention_within(config, max_seq_len: int) -> bool:
    """Every layer attends causally to everything before it up to max_seq_len: no sliding window
    shorter than that (Mistral's and Gemma 3's local layers), no logit soft-capping (Gemma 2)."""
    window = getattr(config, "sliding_window", None)
    windowed = window is not None and window < max_seq_len and getattr(config, "use_sliding_window", True)
    if getattr(config, "layer_types", None) is not None:  # per layer: only the "sliding_attention" ones
        windowed = windowed and any(t != "full_attention" for t in config.layer_types)
    return not windowed and getattr(config, "attn_logit_softcapping", None) is None


class RunnerModule:
    """`forward(input_ids (1, T), cache_position (T,)) -> logits (1, T, V)` — the signature
    ExecuTorch's LLM runner calls — over a transformers model whose attention is
    `_runner_attention`, with one key and one value cache buffer per layer (mutated in place)."""

    @staticmethod
    def wrap(model, max_seq_len: int):
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers llama:: ops for tracing
        import torch
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        from edgedistill.models.families import decoder_layers

        config = model.config.get_text_config()
        if not _full_attention_within(config, max_seq_len):
            return None
        attentions = [getattr(layer, "self_attn", None) for layer in decoder_layers(model)[1]]
        if any(a is None for a in attentions):
            return None
        AttentionInterface.register(ATTENTION, _runner_attention)
        AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # custom_sdpa is causal itself
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for attention in attentions:
            for name in ("et_key_cache", "et_value_cache"):
                attention.register_buffer(name, torch.zeros(1, max_seq_len, heads, head_dim, dtype=model.dtype),
                                          persistent=False)

        class Runner(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, cache_position):
                return self.model(input_ids=input_ids, position_ids=cache_position.unsqueeze(0), use_cache=False).logits

        previous = model.config._attn_implementation
        model.config._attn_implementation = ATTENTION
        runner = Runner()
        if not _same_logits(model, runner, previous):
            model.config._attn_implementation = previous
            return None
        return runner


def _same_logits(model, runner, reference_attention: str, tokens: int = 5) -> bool:
    """The wrapped model, one token per call, gives the model's own logits (transformers'
    attention, the whole sequence at once) — checked, not assumed, for every family."""
    import torch

    ids = torch.arange(1, tokens + 1).unsqueeze(0) % model.config.get_text_config().vocab_size
    with torch.no_grad():
        stepped = torch.cat([runner(ids[:, i:i + 1], torch.tensor([i]))[0] for i in range(tokens)])
        model.config._attn_implementation = reference_attention
        reference = model(ids).logits[0]
        model.config._attn_implementation = ATTENTION
    return bool((stepped - reference).abs().max() < 1e-3 * max(1.0, float(reference.abs().max())))


def row_mean_as_pooling():
    """An ExecuTorch pass: a mean over the last dimension of a tensor of rank ≤ 3 (every RMSNorm's
    `x.pow(2).mean(-1, keepdim=True)`) rewritten as the mean XNNPACK delegates — over the two
    innermost dimensions of a 4-D view, global average pooling. XNNPACK takes no other mean, so
    each norm left a portable op between two delegate partitions: the demo's 24-layer 8da4w student
    lowers into 28 partitions instead of 76, in 5% less time, with the same KL against the fp32
    student (bench/pte_lowering.py, docs/BENCHMARKS.md). The same arithmetic: the fp32 program's
    logits stay within the tests' 1e-4 of transformers'."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass

    mean, view = exir_ops.edge.aten.mean.dim, exir_ops.edge.aten.view_copy.default

    class RowMeanAsPooling(ExportPass):
        def call_operator(self, op, args, kwargs, meta):
            if op is not mean or kwargs.get("dtype") is not None:
                return super().call_operator(op, args, kwargs, meta)
            shape = list(args[0].to_tensor().shape)
            rank, dims = len(shape), args[1]
            if (not 1 <= rank <= 3 or not dims or len(dims) != 1 or dims[0] % rank != rank - 1
                    or not all(isinstance(d, int) for d in shape)):
                return super().call_operator(op, args, kwargs, meta)
            rows = math.prod(shape[:-2]) if rank == 3 else 1
            four = [rows, shape[-2] if rank >= 2 else 1, shape[-1], 1]
            pooled = super().call_operator(view, (args[0], four), {}, meta)
            pooled = super().call_operator(mean, (pooled, [2, 3], True), {}, meta)
            keepdim = len(args) > 2 and bool(args[2])
            return super().call_operator(view, (pooled, shape[:-1] + [1] if keepdim else shape[:-1]), {}, meta)

    return RowMeanAsPooling()


def _trace(model, max_seq_len: int, runner):
    """(ExportedProgram, attention used): `runner` (ExecuTorch's KV-cache ops, `RunnerModule.wrap`)
    where it gave the model's logits, else transformers' static-cache wrapper (sliding windows,
    soft-capping)."""
    import torch
    from transformers.integrations.executorch import (
        TorchExportableModuleForDecoderOnlyLM,
    )

    example = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        if runner is not None:
            return torch.export.export(runner, example, strict=True), "executorch_sdpa"
        model.generation_config.cache_implementation = "static"  # TorchExportableModuleWithStaticCache requires it
        wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
        # strict (dynamo): non-strict lifts the caches as constants and the lowering then fails
        return wrapper.export(input_ids=example[0], cache_position=example[1]), "transformers_static_cache"


def export_pte(folder: Path, destination: Path, pte_type: str, *, max_seq_len: int,
               row_means_in_xnnpack: bool = True) -> PteResult:
    """Write `destination` (.pte) from a Hugging Face model folder, atomically: a family that
    torch.export or the lowering refuses is one UserError and leaves no file behind.
    `row_means_in_xnnpack=False` leaves out `row_mean_as_pooling` (bench/pte_lowering.py compares)."""
    check_executorch()
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )

    from edgedistill.models.hf import count_parameters, load_causal_lm
    from edgedistill.recipe import PTE_TYPES

    if pte_type not in PTE_TYPES:
        raise UserError(f"pte type '{pte_type}' is not one of {', '.join(PTE_TYPES)}")
    prepared = time.perf_counter()
    model, tokenizer, _ = load_causal_lm(str(folder))
    family = model.config.model_type
    parameters = count_parameters(model)
    model.requires_grad_(False)
    cannot_trace = (f"{family}: torch.export cannot trace this family with a static KV cache ({{}}) — export it "
                    "as GGUF only (export.formats = [\"gguf\"])")
    try:
        # The attention path is chosen on the float model: on a quantized one, dynamic activation
        # quantization turns float-rounding differences between one-token steps and a whole
        # sequence into rounding flips (0.49 of logits up to 27.7 on the demo's 8da4w student), which
        # sent every 8da4w program down the slower static-cache path.
        with torch.no_grad():
            runner = RunnerModule.wrap(model, max_seq_len)
    except Exception as exc:  # noqa: BLE001 — the family's attention code raises anything
        raise UserError(cannot_trace.format(f"{type(exc).__name__}: {_first_line(exc)}")) from None
    if pte_type == "8da4w":
        quantize_8da4w(model)
        import executorch.kernels.quantized  # noqa: F401  registers embedding_4bit for to_executorch
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        program, attention = _trace(model, max_seq_len, runner)
    except Exception as exc:  # noqa: BLE001 — dynamo, the cache wrapper and the family raise anything
        raise UserError(cannot_trace.format(f"{type(exc).__name__}: {_first_line(exc)}")) from None
    exported = time.perf_counter()
    metadata = runner_metadata(model, tokenizer, max_seq_len) | {"use_sdpa_with_kv_cache": attention == "executorch_sdpa"}
    try:
        # IR validity checks skipped: -14% lowering time, and the program is run and compared anyway
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], constant_methods=metadata,
                                           transform_passes=[row_mean_as_pooling()] if row_means_in_xnnpack else [],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        executorch_program = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{family}: ExecuTorch cannot lower this family for XNNPACK ({type(exc).__name__}: "
                        f"{_first_line(exc)}) — export it as GGUF only (export.formats = [\"gguf\"])") from None
    graph = edge.exported_program().graph_module.graph
    targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    delegated = sum("executorch_call_delegate" in t for t in targets)
    portable = sorted({t for t in targets if "executorch_call_delegate" not in t and "getitem" not in t
                       and not t.startswith("<")})
    lowered, cpu_s = time.perf_counter(), time.process_time() - cpu_started
    _write_atomic(destination, executorch_program.write_to_file)
    return PteResult(destination, pte_type, destination.stat().st_size, parameters, max_seq_len, attention,
                     exported - started, lowered - exported, cpu_s, delegated, portable,
                     prepare_s=started - prepared, write_s=time.perf_counter() - lowered)


def _write_atomic(destination: Path, write) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        publish_mode(Path(name))
        os.replace(name, destination)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def write_runner_tokenizer(folder: Path, destination: Path) -> list[str]:
    """Copy the tokenizer files the runner (and an app's chat template) need next to the .pte."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, destination / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise UserError(f"{folder}: no tokenizer.json — ExecuTorch's LLM runner reads a Hugging Face tokenizer.json")
    return copied


def byte_fallback_tokenizer(folder: Path) -> bool:
    """SentencePiece-style vocabularies with <0x..> byte pieces (Llama 2, Mistral v0.1, Gemma):
    the stock runner's C++ tokenizer aborts decoding a lone byte piece ('failed to convert utf8
    to codepoint', measured with pytorch-tokenizers 1.5.0), so such a .pte needs an app that
    decodes with its own tokenizer. Byte-level BPE (SmolLM, Qwen, Llama 3) works end to end."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return bool((data.get("model") or {}).get("byte_fallback"))


_POOL_THREADS: int | None = None  # the XNNPACK pool size PteClient set in this process


class PteClient:
    """A loaded .pte answering as verify.LlamaCppClient does: greedy completions with top
    log-probs and llama.cpp-style timings, the C++ tokenizer ExecuTorch's runner uses, and the
    chat template shipped beside the program. A completion whose prompt extends the last one
    reuses the static cache for the shared prefix (as llama.cpp's `cache_prompt`): the cache is
    written by position, and the mask hides everything past the current one.

    XNNPACK runs on `threads` threads of its pool (process-wide). One by default: on this 2-core
    machine the demo's 8da4w program decoded at 47–146 tokens/s (median 50.7) from one round to
    the next with two, and at 158–200 (median 184.6) with one, for prefill 285–369 vs 252–269
    (bench/pte_threads.py, docs/BENCHMARKS.md)."""

    def __init__(self, pte: Path, tokenizer_dir: Path, threads: int = 1):
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  llama::custom_sdpa / update_cache kernels
        import executorch.kernels.quantized  # noqa: F401  embedding_4bit must be registered before loading
        from executorch.extension.pybindings.portable_lib import (
            _unsafe_reset_threadpool,
        )
        from executorch.runtime import Runtime
        from pytorch_tokenizers import CppHFTokenizer

        from edgedistill.models.vocab import VocabMap

        global _POOL_THREADS
        if _POOL_THREADS != threads:  # resizing the pool under a program that ran on it can crash: once per process
            _unsafe_reset_threadpool(threads)
            _POOL_THREADS = threads
        self.threads = threads
        program = Runtime.get().load_program(str(pte))
        self.metadata = {name: program.load_method(name).execute([]) for name in program.method_names
                         if name != "forward"}
        self.forward = program.load_method("forward")
        self.max_seq_len = int(self.metadata["get_max_seq_len"][0])
        self.eos = set(int(i) for i in self.metadata["get_eos_ids"])
        self.cpp_tokenizer = CppHFTokenizer()
        self.cpp_tokenizer.load(str(tokenizer_dir / "tokenizer.json"))
        self.tokenizer = _tokenizer_only(tokenizer_dir)
        self.id_bytes = VocabMap(self.tokenizer).id_bytes
        self.cached: list[int] = []

    def close(self) -> None:
        self.forward = None

    def tokenize(self, text: str) -> list[int]:
        return list(self.cpp_tokenizer.encode(text, 0, 0))

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _step(self, token: int, position: int):
        import torch

        logits = self.forward.execute([torch.tensor([[token]], dtype=torch.long),
                                       torch.tensor([position], dtype=torch.long)])[0]
        return logits[0, -1].float()

    def complete(self, prompt_ids: list[int], n_predict: int, n_probs: int = 0, ignore_eos: bool = False,
                 cache_prompt: bool = True) -> dict:
        import torch

        n_predict = max(0, min(n_predict, self.max_seq_len - len(prompt_ids)))
        if not prompt_ids or len(prompt_ids) >= self.max_seq_len:
            raise UserError(f"a prompt of {len(prompt_ids)} tokens does not fit the .pte's static cache of "
                            f"{self.max_seq_len} (export.pte_max_seq_len)")
        reuse = 0
        if cache_prompt:
            while reuse < min(len(self.cached), len(prompt_ids) - 1) and self.cached[reuse] == prompt_ids[reuse]:
                reuse += 1
        started = time.perf_counter()
        logits = None
        for position in range(reuse, len(prompt_ids)):
            logits = self._step(prompt_ids[position], position)
        prefilled = time.perf_counter()
        self.cached = list(prompt_ids)
        tokens, entries, steps = [], [], 0
        while logits is not None and len(tokens) < n_predict:
            logprobs = torch.log_softmax(logits, -1)
            token = int(logprobs.argmax())
            if token in self.eos and not ignore_eos:
                break
            if n_probs:
                top = torch.topk(logprobs, n_probs)
                entries.append({"id": token, "bytes": list(self.id_bytes.get(token, b"")),
                                "top_logprobs": [{"id": int(i), "logprob": float(v)}
                                                 for v, i in zip(top.values.tolist(), top.indices.tolist())]})
            tokens.append(token)
            logits = None
            if len(tokens) < n_predict and len(self.cached) + 1 < self.max_seq_len:
                logits = self._step(token, len(self.cached))
                self.cached.append(token)
                steps += 1
        decoded = time.perf_counter()
        prompt_n = len(prompt_ids) - reuse
        timings = {"prompt_n": prompt_n, "prompt_ms": 1000 * (prefilled - started),
                   "prompt_per_second": prompt_n / max(prefilled - started, 1e-9),
                   "predicted_n": len(tokens), "predicted_ms": 1000 * (decoded - prefilled),
                   # one forward call per decoded token after the first (which the prompt's last call gave)
                   "predicted_per_second": steps / max(decoded - prefilled, 1e-9) if steps else 0.0}
        return {"tokens": tokens, "content": self.tokenizer.decode(tokens, skip_special_tokens=True),
                "completion_probabilities": entries, "timings": timings}


def _tokenizer_only(folder: Path):
    """The shipped tokenizer folder as transformers reads it (it holds no model config)."""
    from transformers import AutoTokenizer

    from edgedistill.models.hf import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    prepare_tokenizer(tokenizer)
    return tokenizer


def transformers_distributions(model, sequences: list[list[int]], max_positions: int, n_probs: int = 64):
    """The model's own next-token distributions, teacher-forced, in the layout verify.teacher_forced
    gives for a served file (one row per position after the first token, top n_probs): the
    reference a .pte's KL and top-1 agreement are measured against."""
    import numpy as np
    import torch

    from edgedistill.export.verify import Distributions

    rows = []
    for sequence in sequences:
        if len(rows) >= max_positions:
            break
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0, :-1].float(), -1)
        top = torch.topk(logprobs[:max_positions - len(rows)], n_probs)
        rows += [(ids.numpy(), values.double().numpy()) for ids, values in zip(top.indices, top.values)]
    return Distributions([(np.asarray(i), np.asarray(v)) for i, v in rows])


def quantized_reference(folder: Path):
    """The student quantized by torchao exactly as the 8da4w program is, run by transformers in
    PyTorch: what the program must reproduce up to kernel rounding (quantization error apart)."""
    from edgedistill.models.hf import load_causal_lm

    model, _, _ = load_causal_lm(str(folder))
    quantize_8da4w(model)
    return model

