"""Shared fixtures: the network blocked beyond loopback, and a tiny random chat model on disk."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


NETGUARD_DIR = Path(__file__).parent / "_netguard"
# Install the guard in this process (by path: another sitecustomize may already be imported).
_spec = importlib.util.spec_from_file_location("edgedistill_netguard", NETGUARD_DIR / "sitecustomize.py")
netguard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netguard)


def subprocess_env() -> dict[str, str]:
    """Environment for `edgedistill` subprocesses: offline, with the same network guard."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(NETGUARD_DIR), os.environ.get("PYTHONPATH")]))}


def build_tiny_tokenizer():
    """A byte-level BPE (vocab ~400) trained on the bundled seed texts, with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgedistill.data.prompts import read_seed_texts

    texts = read_seed_texts("bundled:en") + read_seed_texts("bundled:ja")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


# Reasoning templates on the tiny vocabulary (tests of traces). Qwen3's assistant branch: the last
# assistant turn renders its trace (`reasoning_content`, or split from the content at </think>)
# as <think>\n…\n</think>\n\n, which is what llama.cpp's template analysis detects as a thinking
# template (measured with xllamacpp 2026.10: "reasoning_mode: TAG_BASED"); `enable_thinking=false`
# prefills an empty block. R1's generation prompt opens the trace itself.
QWEN3_THINK = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] or '' %}"
    "{% set reasoning = m['reasoning_content'] if m['reasoning_content'] is defined and m['reasoning_content'] is string else '' %}"
    "{% if not reasoning and '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "{% if loop.last and reasoning %}"
    "<|im_start|>assistant\n<think>\n{{ reasoning }}\n</think>\n\n{{ content }}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>assistant\n{{ content }}<|im_end|>\n"
    "{% endif %}"
    "{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
R1_THINK = QWEN3_THINK.replace(
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}",
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}")
HARMONY_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"]
# gpt-oss's harmony layout (openai/gpt-oss chat template, shortened): the effort in the system turn,
# earlier assistant turns as `final` only, the last one's `thinking` as the analysis channel.
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are a tiny model.\nReasoning: {{ reasoning_effort | default('medium') }}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|start|>user<|message|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}"
    "{% if loop.last and not add_generation_prompt and m.get('thinking') %}"
    "<|start|>assistant<|channel|>analysis<|message|>{{ m['thinking'] }}<|end|>{% endif %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}"
    "{% if loop.last and not add_generation_prompt %}<|return|>{% else %}<|end|>{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def build_tiny_think_tokenizer(style: str = "qwen3"):
    """The tiny tokenizer with <think> (id 400) and </think> (id 401) as added, non-special tokens
    (as in Qwen3: they survive skip_special_tokens) and a thinking template."""
    from tokenizers import AddedToken

    tok = build_tiny_tokenizer()
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    tok.chat_template = {"qwen3": QWEN3_THINK, "r1": R1_THINK}[style]
    return tok


def build_tiny_harmony_tokenizer():
    """The tiny tokenizer with gpt-oss's harmony special tokens (ids 400-406), ending on <|return|>."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": HARMONY_SPECIALS})
    tok.chat_template = HARMONY_TEMPLATE
    tok.eos_token = "<|return|>"
    return tok


def build_tiny_spm_tokenizer():
    """A SentencePiece-style BPE (Llama 2 layout: ▁ for spaces, byte fallback <0x..>), ~960 ids."""
    import json
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgedistill.data.prompts import read_seed_texts

    texts = read_seed_texts("bundled:en") + read_seed_texts("bundled:ja")
    # The 300 most frequent characters, ties broken by character: the trainer's own
    # limit_alphabet breaks ties by hash order, so every run built a different model.
    counts = Counter("\u2581".join(texts).replace(" ", "\u2581"))
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:300]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=alphabet, limit_alphabet=len(alphabet)))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # the byte-fallback pieces, in the model vocabulary as in Llama 2
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["pre_tokenizer"] = None
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>[assistant]{% endif %}")
    return fast


def build_tiny_model(tokenizer, model_type: str = "llama", layers: int = 4):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A random 4-layer Llama chat model saved as a local Hugging Face folder (safetensors).

    initializer_range 0.2 (not 0.02) so greedy answers vary instead of repeating one token.
    """
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_f32_gguf(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The tiny teacher as an F32 GGUF: with `serve --exact` llama.cpp scores it as transformers
    does (the export tests assert 1e-4 per log-probability)."""
    from edgedistill.export.gguf import export_gguf

    return export_gguf(tiny_teacher_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32", name="tiny").path
def build_chain_model(tokenizer, chain: list[int], start: int, hidden: int = 64):
    """A Llama whose greedy answer is `chain`, whatever the prompt ends with `start`: its blocks add
    nothing (attention and MLP output projections zero), so the next token depends on the current
    one only, and the LM head row of each chain token is the normed embedding of the token before
    it (score H = 64 there, against ~N(0, 64) for unrelated rows). Tokens may not repeat."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    assert len(set(chain)) == len(chain) and start not in chain
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        normed = embed / embed.pow(2).mean(-1, keepdim=True).add(config.rms_norm_eps).sqrt()
        head = torch.zeros_like(model.lm_head.weight)
        for before, token in zip([start, *chain[:-1]], chain):
            head[token] = normed[before]
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="session")
def reasoning_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llama folders whose tokenizers write traces: 'qwen3' and 'r1' (<think> tags,
    the latter opening the trace in its generation prompt) and 'harmony' (gpt-oss's markers)."""
    built = {"qwen3": build_tiny_think_tokenizer("qwen3"), "r1": build_tiny_think_tokenizer("r1"),
             "harmony": build_tiny_harmony_tokenizer()}
    folders = {}
    for name, tokenizer in built.items():
        folders[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        build_tiny_model(tokenizer).save_pretrained(folders[name], safe_serialization=True)
        tokenizer.save_pretrained(folders[name])
    return folders


def tiny_recipe_for(teacher_dir: Path, runs_dir: Path):
    """The whole path on the tiny model: 8 prompts, 8-token answers, 2-layer student, the SFT
    baseline, two bundled eval sets, the judge, two GGUF files."""
    from edgedistill.recipe import build_recipe

    return build_recipe({
        "run": {"name": "tiny", "runs_dir": str(runs_dir)},
        "teacher": {"model": str(teacher_dir)},
        "generate": {"limit_per_source": 4, "max_new_tokens": 8, "batch_size": 4, "top_k_logprobs": 16},
        "student": {"keep_layers": 2, "strategy": "angular", "probe_samples": 4},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "sft_baseline": True},
        "evaluate": {"speed_prompts": 1, "speed_tokens": 8, "judge": True, "tasks": [
            {"name": "mc_ja", "path": "bundled:mc_ja", "limit": 3, "max_new_tokens": 6},
            {"name": "arith_en", "path": "bundled:arith_en", "limit": 3, "max_new_tokens": 6}]},
        "export": {"types": ["f16", "q8_0"], "parity_prompts": 2, "parity_tokens": 8, "eval_positions": 48,
                   "speed_prompt_tokens": 32, "speed_tokens": 8},
    }, "<tiny test recipe>")


@pytest.fixture()
def tiny_recipe(tiny_teacher_dir, tmp_path):
    return tiny_recipe_for(tiny_teacher_dir, tmp_path / "runs")


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class ScriptedTeacher:
    """A registered teacher backend for tests of the data engine: it 'invents' tasks by quoting
    real questions (GSM8K in English, JCommonsenseQA in Japanese, from ../shared/data), plus one
    copy of an example and one blacklisted task per request, and answers other prompts with a
    short text. Its output is a pure function of the prompt, like a greedy model's."""

    model_id = "scripted"

    def __init__(self, teacher_cfg, gen_cfg):
        import json

        from edgedistill.teachers import Usage

        self.usage = Usage()
        read = lambda path, key: [json.loads(line)[key] for line in path.read_text().splitlines()[:400]]
        self.corpus = {"en": read(SHARED_DATA / "gsm8k" / "train.jsonl", "question"),
                       "ja": read(SHARED_DATA / "jcommonsenseqa" / "train-v1.3.jsonl", "question")}

    def chat(self, batch, sampling=None):
        import hashlib

        from edgedistill.data.selfinstruct import parse_tasks
        from edgedistill.models.hf import Completion

        out = []
        for messages in batch:
            prompt = messages[-1]["content"]
            if sampling is None:
                text = f"Answer: {prompt[:20]}"
            else:
                ja = "指示" in prompt
                examples = parse_tasks(prompt)
                corpus = self.corpus["ja" if ja else "en"]
                start = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(corpus)
                ideas = [corpus[(start + i) % len(corpus)] for i in range(3)]
                ideas += [examples[0].instruction, "写真を撮って送ってください。" if ja else "Draw a picture of a cat."]
                label, noinput = ("指示：", "入力：なし") if ja else ("Instruction: ", "Input: <noinput>")
                text = "\n".join(f"{len(examples) + i + 1}. {label}{idea}\n{noinput}" for i, idea in enumerate(ideas))
            out.append(Completion(prompt_ids=[1, 2], token_ids=[3, 4, 5], text=text, finished=True))
        self.usage.requests += len(batch)
        return out


@pytest.fixture()
def scripted_teacher():
    if not (SHARED_DATA / "gsm8k").is_dir() or not (SHARED_DATA / "jcommonsenseqa").is_dir():
        pytest.skip("../shared/data not present")
    from edgedistill.teachers import register_backend

    register_backend("scripted")(ScriptedTeacher)
    return "scripted"


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def chromium_page():
    """A page in headless Debian Chromium driven by playwright (which never downloads a browser).
    `make browser` installs Chromium; without it the test is skipped here and fails under CI."""
    if not CHROMIUM.is_file() or importlib.util.find_spec("playwright") is None:
        message = "headless Chromium test needs /usr/bin/chromium and playwright — run `make browser`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


class ServeProcess:
    """`edgedistill serve TARGET` on a free loopback port, ready when /health answers 200."""

    def __init__(self, target: str, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1"):
        from edgedistill.net import free_port

        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgedistill", "serve", target, "--host", host, "--port", str(self.port), *args],
            env=subprocess_env() | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.base = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.2)

    def engine_port(self) -> int:
        """The loopback port of the engine `serve` started (its child process's --port)."""
        for child in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split():
            command = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
            if "--port" in command:
                return int(command[command.index("--port") + 1])
        raise AssertionError("serve started no engine process")

    def client(self, key: str = "none"):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> str:
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err
