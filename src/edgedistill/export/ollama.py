"""An Ollama Modelfile next to the GGUF: `ollama create NAME -f Modelfile` and it runs.

Why we write the TEMPLATE ourselves: Ollama speaks Go templates, not the Jinja chat template
inside the GGUF, and only recognises some Jinja templates on its own. The two families small
open models use — ChatML (<|im_start|>, SmolLM2, Qwen) and Llama 3 headers — are translated
here; for any other template the Modelfile says so and leaves TEMPLATE to Ollama. Every
end-of-turn token becomes a `PARAMETER stop`, so answers end where the model ends its turn. A
reasoning student keeps its thinking format: the ChatML template gets Ollama's thinking form
(the end-of-trace tag is not a stop token: the answer follows it).
"""

from __future__ import annotations

import re
from pathlib import Path

from edgedistill.models.reasoning import ReasoningStyle
from edgedistill.run import atomic_write_text

CHATML = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
'''
LLAMA3 = '''{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

'''
# ChatML with a trace, after Ollama's own qwen3 template: the template reading `.Thinking` is
# what makes Ollama treat the model as a thinking one (its `think` option, `message.thinking`),
# and the tags around `.Thinking` are the ones its parser splits on. `think: false` prefills an
# empty trace, as the Jinja template's enable_thinking=False does; OPEN_PROMPT is where an
# opened template (R1 style) starts the trace itself.
CHATML_THINKING = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ if and (eq .Role "assistant") $last .Thinking }}OPEN
{{ .Thinking }}
CLOSE

{{ end }}{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ if and $.IsThinkSet (not $.Think) }}OPEN

CLOSE

{{ else }}OPEN_PROMPT{{ end }}'''
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^<{}]+?)<\|im_end\|>")


def chatml_template(style: ReasoningStyle | None) -> str:
    """Our ChatML TEMPLATE; with a `<think>`-style trace, the thinking form."""
    if style is None or style.kind != "think":
        return CHATML
    return (CHATML_THINKING.replace("OPEN_PROMPT", f"{style.open}\n" if style.opened else "")
            .replace("OPEN", style.open).replace("CLOSE", style.close))


def template_family(chat_template: str) -> str | None:
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    return None


def modelfile(gguf_name: str, chat_template: str | None, stop_tokens: list[str], context: int = 4096,
              style: ReasoningStyle | None = None, licence: str = "") -> str:
    """`style`: the trace form the model writes (models/reasoning.py), kept in the template;
    `licence`: the teacher's terms, carried as the Modelfile's LICENSE."""
    family = template_family(chat_template or "")
    lines = ["# Made by edgedistill. Use: ollama create <name> -f Modelfile && ollama run <name>",
             f"FROM ./{gguf_name}"]
    if style is not None and style.kind == "harmony":
        lines.append("# Reasoning: harmony channels (analysis = thinking, final = answer), as in the GGUF's template.")
    elif style is not None:
        lines.append(f"# Reasoning: the trace between {style.open} and {style.close} is Ollama's `thinking` "
                     "(`ollama run --think=false` skips it).")
    if family == "chatml":
        lines.append(f'TEMPLATE """{chatml_template(style)}"""')
        default_system = _DEFAULT_SYSTEM.search(chat_template or "")
        if default_system:  # the system prompt the Jinja template adds when none is given
            lines.append(f'SYSTEM """{default_system.group(1)}"""')
    elif family == "llama3":
        lines.append(f'TEMPLATE """{LLAMA3}"""')
    else:
        lines.append("# The chat template is not ChatML or Llama 3: Ollama reads it from the GGUF itself.")
    stops = dict.fromkeys(stop_tokens + {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"]}.get(family or "", []))
    lines += [f'PARAMETER stop "{token}"' for token in stops if token]
    lines += ["PARAMETER temperature 0.2", "PARAMETER top_p 0.9", f"PARAMETER num_ctx {context}"]
    if licence:  # `ollama show --license`; a Modelfile string cannot hold its own closing quotes
        lines.append(f'LICENSE """{licence.replace(chr(34) * 3, chr(8221) * 3)}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, gguf_name: str, chat_template: str | None, stop_tokens: list[str],
                    context: int = 4096, style: ReasoningStyle | None = None, licence: str = "") -> Path:
    path = folder / "Modelfile"
    atomic_write_text(path, modelfile(gguf_name, chat_template, stop_tokens, context, style, licence))
    return path
