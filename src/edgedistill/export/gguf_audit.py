"""The refusal and leakage audits (evaluate/audit.py) of a GGUF file, in llama.cpp.

Done here, in the export stage, because this is where each file is written and loaded: the
stage answers the same requests and probes as the evaluate stage gave the HF models, through
llama.cpp's own server, and logs the results under the file's subject (`gguf:<type>`), as it
does for the held-out answers. The prompts are token ids from the student's tokenizer and chat
template (the parity check shows llama.cpp tokenises them the same). Canary exposure is left to
the F32 student in the evaluate stage: scoring ~1000 candidates per canary needs a forward per
token position here (llama.cpp returns no prompt log-probabilities).
"""

from __future__ import annotations

from edgedistill.evaluate.audit import (
    LEAK_PROMPT_TOKENS,
    LEAK_TOKENS,
    Answerer,
    AuditInputs,
    audit,
)
from edgedistill.export.verify import LlamaCppClient, greedy_completions
from edgedistill.models.hf import encode_prompts


def llamacpp_answerer(client: LlamaCppClient, tokenizer) -> Answerer:
    def chat(prompts: list[str], max_new_tokens: int) -> list[str]:
        ids = encode_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
        return [str(out.get("content", "")).strip() for out in greedy_completions(client, ids, max_new_tokens)]

    def continue_text(prefixes: list[str]) -> list[str]:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-LEAK_PROMPT_TOKENS:] for p in prefixes]
        return [str(out.get("content", "")) for out in greedy_completions(client, ids, LEAK_TOKENS)]

    return Answerer(chat, continue_text, None)


def audit_file(client: LlamaCppClient, inputs: AuditInputs, tokenizer) -> dict:
    """The file's audit metrics, and its answers under "audit" (kept in export.json)."""
    if not inputs.has_work(tokenizer):
        return {}
    metrics, record = audit(llamacpp_answerer(client, tokenizer), inputs, tokenizer)
    return metrics | {"audit": record}
