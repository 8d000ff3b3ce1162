"""The on-device bundle: one folder to copy to a phone — the GGUF files (llama.cpp-based apps),
the .pte programs (ExecuTorch), the tokenizer the ExecuTorch runner reads, the model card, and
a README with the commands. Files are hard links into export/ (no second copy of hundreds of
MB), copies where the file system has no hard links. The folder is built beside the old one
and swapped in, so a crash leaves the previous bundle or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgedistill.export.pte import TOKENIZER_FILES
from edgedistill.run import atomic_write_text, publish_mode

BUNDLE = "bundle"
CARD = "MODEL_CARD.md"


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or none of them allow hard links
        shutil.copy2(source, target)


def bundle_readme(name: str, ggufs: list[str], ptes: list[str], prompt_example: str, byte_fallback: bool) -> str:
    """How to run the files on Android and iOS, with the paths of this bundle."""
    gguf = next((g for g in ggufs if "q8_0" in g), ggufs[0] if ggufs else f"{name}.gguf")
    pte = next((p for p in ptes if "8da4w" in p), ptes[0] if ptes else "")
    lines = [f"# {name} — on-device bundle", "",
             "The distilled student in two runtimes, with its tokenizer and model card (`MODEL_CARD.md`: what it "
             "learned from, how well it does, its licence). Every file here was checked against transformers in its "
             "own runtime by the export stage (`../export.json`).", "",
             "| file | runtime |", "|---|---|"]
    lines += [f"| `{g}` | llama.cpp and the apps built on it (GGUF) |" for g in ggufs]
    lines += [f"| `{p}` | ExecuTorch (XNNPACK, CPU), through its LLM runner |" for p in ptes]
    lines += ["| `tokenizer.json`, `tokenizer_config.json` | the tokenizer ExecuTorch's runner reads (Hugging Face format) |",
              "| `chat_template.jinja` | the chat template (the .pte runner does not apply one: format prompts with it) |",
              "", "## GGUF: llama.cpp-based apps", "",
              "Android and iOS apps that embed llama.cpp (for example PocketPal AI, or llama.cpp's own "
              "`examples/llama.android` and `examples/llama.swiftui`) load a local `.gguf` file. The chat template is "
              "inside the file. Copy it to the phone and pick it in the app:", "",
              "```sh", f"adb push {gguf} /sdcard/Download/          # Android; on iOS use Finder or the Files app", "```",
              "", "Or run llama.cpp's server in Termux on Android and chat in the phone's browser at http://127.0.0.1:8080:",
              "", "```sh", "pkg install llama-cpp", "termux-setup-storage   # once: lets Termux read /sdcard",
              f"llama-server -m /sdcard/Download/{gguf} --port 8080", "```"]
    if ptes:
        lines += ["", "## .pte: ExecuTorch's LLM runner", "",
                  "Each .pte holds its runner metadata (maximum sequence length, end-of-sequence ids, KV cache) and "
                  "takes one token per call. The 8da4w program also uses ExecuTorch's quantized embedding kernel "
                  "(`quantized_decomposed::embedding_4bit`): a custom C++ build links `quantized_ops_lib`.", "",
                  "Android — ExecuTorch's LlamaDemo app (github.com/pytorch/executorch-examples, `llm/android/LlamaDemo`) "
                  "lists the .pte and tokenizer files in `/data/local/tmp/llama/`:", "",
                  "```sh", "adb shell mkdir -p /data/local/tmp/llama",
                  f"adb push {pte} tokenizer.json tokenizer_config.json /data/local/tmp/llama/", "```", "",
                  "From Java/Kotlin: `new LlmModule(\"/data/local/tmp/llama/" + pte + "\", "
                  "\"/data/local/tmp/llama/tokenizer.json\", 0.0f)` (org.pytorch.executorch.extension.llm).", "",
                  "iOS — ExecuTorch's iOS LLaMA demo app (same repository, `llm/apple`): add the .pte and "
                  "`tokenizer.json` to the app's documents and select them in the app.", "",
                  "Desktop check with the runner's Python bindings (`pip install executorch==1.5.1`):", "",
                  "```python", "import executorch.kernels.quantized  # the 4-bit embedding kernel",
                  "from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner",
                  f"runner = TextLLMRunner(\"{pte}\", \".\")  # the folder: tokenizer.json + tokenizer_config.json",
                  f"runner.generate({prompt_example!r}, GenerationConfig(max_new_tokens=64, temperature=0.0, echo=False))",
                  "```", "",
                  "ExecuTorch's C++ example runner (`examples/models/llama`, built with the LLM runner and "
                  "quantized kernels): `llama_main --model_path=" + pte + " --tokenizer_path=. --temperature=0 "
                  "--prompt=\"…\"`.", "",
                  "The runner does not apply a chat template: send the prompt already formatted, e.g. one user "
                  "message `Hello` becomes", "", "```", prompt_example, "```"]
        if byte_fallback:
            lines += ["", "**Note:** this vocabulary uses SentencePiece byte-fallback pieces (`<0x..>`). ExecuTorch's "
                      "C++ Hugging Face tokenizer (pytorch-tokenizers 1.5.0) aborts decoding a lone byte piece, so the "
                      "stock runner can stop mid-answer; decode the generated ids with your own tokenizer, or use the "
                      "GGUF file."]
    return "\n".join(lines) + "\n"


def write_bundle(export_dir: Path, name: str, prompt_example: str, byte_fallback: bool) -> Path:
    """export/bundle/: links to the .gguf and .pte files, the tokenizer, the card, a README."""
    ggufs = sorted(p.name for p in export_dir.glob("*.gguf"))
    ptes = sorted(p.name for p in export_dir.glob("*.pte"))
    target = export_dir / BUNDLE
    staging = Path(tempfile.mkdtemp(dir=export_dir, prefix=f".{BUNDLE}."))
    try:
        for file_name in ggufs + ptes + [n for n in TOKENIZER_FILES if (export_dir / n).is_file()]:
            _link(export_dir / file_name, staging / file_name)
        if (export_dir / "README.md").is_file():
            _link(export_dir / "README.md", staging / CARD)
        atomic_write_text(staging / "README.md", bundle_readme(name, ggufs, ptes, prompt_example, byte_fallback))
        publish_mode(staging)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=export_dir, prefix=f".{BUNDLE}.old."))
            os.replace(target, old / BUNDLE)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
