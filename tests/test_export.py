"""GGUF export, verified in the real llama.cpp runtime (xllamacpp's server on 127.0.0.1)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    build_tiny_model,
    build_tiny_spm_tokenizer,
    build_tiny_tokenizer,
    subprocess_env,
)

from edgedistill.errors import UserError
from edgedistill.export.gguf import export_gguf
from edgedistill.export.ollama import modelfile
from edgedistill.export.verify import (
    LlamaCppClient,
    _greedy_split,
    _position_of,
    check_parity,
    greedy_along,
    serve,
    sparse_kl_top1,
    teacher_forced,
)

CONVERSATIONS = [[{"role": "user", "content": "Name three fruits."}],
                 [{"role": "user", "content": "日本の首都はどこですか？"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi 🙂"}]]


def tiny_folder(tmp_path: Path, model_type: str, sentencepiece: bool = False, tied: bool = True) -> Path:
    from edgedistill.models.hf import prepare_tokenizer

    tokenizer = build_tiny_spm_tokenizer() if sentencepiece else build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, model_type, layers=2)
    if not tied:  # a separate output matrix, written as output.weight
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.2)
    if model_type == "qwen2":  # non-zero q/k/v biases, so a wrong bias layout cannot hide
        torch.manual_seed(1)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    folder = tmp_path / (model_type + ("-spm" if sentencepiece else "") + ("" if tied else "-untied"))
    model.save_pretrained(folder)
    prepare_tokenizer(tokenizer)
    tokenizer.save_pretrained(folder)
    return folder


def parity_of(folder: Path, gguf: Path, tokens: int = 12, exact: bool = False):
    from edgedistill.models.hf import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(folder))
    with serve(gguf, threads=1, ctx=1024, exact=exact) as server:
        client = LlamaCppClient(server)
        try:
            return check_parity(client, model, tokenizer, CONVERSATIONS, tokens)
        finally:
            client.close()


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("qwen2", True), ("llama", False)])
def test_f32_gguf_runs_in_llamacpp_exactly_as_in_transformers(tmp_path, model_type, tied):
    from gguf import GGUFReader

    folder = tiny_folder(tmp_path, model_type, tied=tied)
    result = export_gguf(folder, tmp_path / "out" / "tiny-f32.gguf", "f32", name="tiny")
    assert result.bits_per_weight == 32.0 and result.tensor_types == {"F32": result.tensor_types["F32"]}
    assert ("output.weight" in {t.name for t in GGUFReader(result.path).tensors}) is not tied
    # F32 weights and float32 attention in llama.cpp: ≤ 4e-6 measured over 11 random models
    # (its default F16 KV cache and flash attention alone give up to 0.010).
    parity = parity_of(folder, result.path, exact=True)
    assert parity.tokenizer_match and parity.template_match, parity.first_difference
    assert parity.greedy_match + parity.near_tie_splits == len(CONVERSATIONS), parity.first_difference
    assert parity.compared_positions >= 50 and parity.max_logprob_diff < 1e-4, parity


def test_greedy_split_measures_transformers_gap_where_the_paths_part():
    logprobs = torch.log_softmax(torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.99, 0.0],
                                               [0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0]]), -1)
    at, gap = _greedy_split([0, 1, 3], [0, 2, 3], logprobs, eos=0)  # llama.cpp took the runner-up
    assert at == 1 and gap == pytest.approx(0.01, abs=1e-5)
    at, gap = _greedy_split([0, 1, 3, 2], [0, 1, 3], logprobs, eos=0)  # llama.cpp ended: chose eos
    assert at == 3 and gap == pytest.approx(float(logprobs[3, 2] - logprobs[3, 0]))
    assert gap < 0  # transformers preferred eos there itself: not a near tie, a real split


def test_greedy_along_reads_transformers_greedy_answer_off_the_runtimes_path():
    """Token 0 ends a turn. Rows: argmax 1, then 3, then 0 (end) — or 2 in the last row of `on`."""
    rows = torch.tensor([[0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 1.0, 2.0], [2.0, 0.0, 1.0, 0.0]])
    logprobs = torch.log_softmax(rows, -1)
    assert greedy_along([1, 3], logprobs, {0}, 8) == [1, 3, 0]  # the runtime stopped without returning the end
    assert greedy_along([1, 3, 0], logprobs, {0}, 8) == [1, 3, 0]  # it returned the end token
    assert greedy_along([1, 2], logprobs, {0}, 8) == [1, 3]  # the paths part at step 1: stop there
    assert greedy_along([1, 3], logprobs, {0}, 2) == [1, 3]  # max_new_tokens reached: no row after it read
    on = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 2.0, 1.0]]), -1)
    reference = greedy_along([1, 3], on, {0}, 8)
    assert reference == [1, 3, 2]  # transformers would go on where the runtime ended
    assert _greedy_split(reference, [1, 3], on, eos=0)[0] == 2


def test_logprob_entries_align_with_the_tokens_whose_bytes_they_carry():
    """As llama.cpp answered for a byte-fallback model (seen in a run of the test below): the lone
    0xC1 byte token got no entry, its byte went to the next one; repeats must not shift pairs."""
    id_bytes = {222: "朝".encode(), 893: b"\xc1", 610: b"ns", 213: "新".encode(), 2: b"</s>"}
    tokens = [222, 893, 610, 213, 213, 2]
    entries = [{"id": 222, "bytes": list("朝".encode())}, {"id": 610, "bytes": [0xC1, 0x6E, 0x73]},
               {"id": 213, "bytes": list("新".encode())}, {"id": 213, "bytes": list("新".encode())},
               {"id": 2, "bytes": []}]  # special tokens come back with no bytes
    assert [position for position, _ in _position_of(tokens, entries, id_bytes)] == [0, 2, 3, 4, 5]
    entries[1] = {"id": 610, "bytes": list(b"ns")}  # out of step: stop, never pair by guess
    assert [position for position, _ in _position_of(tokens, entries, id_bytes)] == [0]


def test_sentencepiece_vocabulary_tokenizes_as_in_transformers(tmp_path):
    """Llama 2 / Mistral layout: ▁ for spaces, <0x..> byte fallback, scores from the merges."""
    from gguf import GGUFReader

    folder = tiny_folder(tmp_path, "llama", sentencepiece=True)
    result = export_gguf(folder, tmp_path / "out" / "spm-f32.gguf", "f32", name="spm")
    fields = GGUFReader(result.path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama" and "tokenizer.ggml.scores" in fields
    parity = parity_of(folder, result.path, exact=True)
    assert parity.tokenizer_match and parity.template_match, parity.first_difference
    # A random model can have near-ties (0.0035 nats seen when this vocabulary still changed
    # from run to run) that even float32 rounding differences may flip.
    assert parity.greedy_match + parity.near_tie_splits == len(CONVERSATIONS), parity
    assert parity.compared_positions >= 50 and parity.max_logprob_diff < 1e-4, parity


def test_real_smollm2_weights_export_f16_with_parity():
    """The embedded teacher's real weights (the demo student is a cut of them)."""
    from edgedistill.models.hf import gguf_as_safetensors, resolve_source

    folder = gguf_as_safetensors(resolve_source("embedded"))
    out = Path(folder.parent.parent / "test-export")  # beside the cache, not in the repo
    result = export_gguf(folder, out / "smollm2-f16.gguf", "f16", name="smollm2")
    try:
        assert 15.9 < result.bits_per_weight < 16.2 and result.parameters > 134e6
        parity = parity_of(folder, result.path, tokens=16)
        assert parity.tokenizer_match and parity.template_match, parity.first_difference
        # fp16 weights vs float32: near-ties may flip late in an answer (0.0000 nats apart seen at
        # step 14), log-probs stay close.
        assert parity.greedy_match + parity.near_tie_splits == len(CONVERSATIONS), parity
        assert parity.max_logprob_diff < 0.1, parity
    finally:
        result.path.unlink(missing_ok=True)


def test_quantised_files_keep_embeddings_8_bit_and_carry_provenance(tmp_path):
    from gguf import GGUFReader

    folder = tiny_folder(tmp_path, "llama")
    bits = {}
    for export_type in ("f16", "q8_0", "q4_0", "q4_k_m"):
        result = export_gguf(folder, tmp_path / f"tiny-{export_type}.gguf", export_type, name="tiny",
                             metadata={"general.license": "apache-2.0", "edgedistill.run": "unit"})
        bits[export_type] = result.bits_per_weight
    assert bits["f16"] > bits["q8_0"] > bits["q4_k_m"] > bits["q4_0"]
    reader = GGUFReader(tmp_path / "tiny-q4_0.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    fields = reader.fields
    assert fields["general.license"].contents() == "apache-2.0" and fields["edgedistill.run"].contents() == "unit"
    assert "edgedistill.version" in fields and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    # 32-wide rows do not split into K-quant super-blocks: llama.cpp's fallbacks apply.
    k_types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "tiny-q4_k_m.gguf").tensors}
    assert k_types["blk.0.attn_q.weight"] == "Q5_0" and k_types["blk.0.attn_v.weight"] == "Q5_0"
    assert k_types["blk.1.attn_v.weight"] == "Q8_0"  # Q6_K (last layer: more bits) falls back to Q8_0


def test_many_prompts_in_one_request_answer_in_order_and_repeat_exactly(tmp_path):
    """complete_many: all prompts in one request, decoded on 4 slots as slots free up; each reply
    is its own prompt's (by length: the server reports the tokens it evaluated) and is the
    greedy answer a lone request gets, and a fresh server gives the same replies again."""
    from edgedistill.models.hf import encode_prompts

    folder = tiny_folder(tmp_path, "llama")
    gguf = export_gguf(folder, tmp_path / "tiny-f32.gguf", "f32", name="tiny").path
    tokenizer = build_tiny_tokenizer()
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": "word " * n}] for n in range(1, 12)])
    runs = []
    for _ in range(2):
        with serve(gguf, threads=1, ctx=256, slots=4, exact=True) as server:
            client = LlamaCppClient(server, slots=4)
            replies = client.complete_many(prompts, 6 + len(runs))
            lone = [client.complete(p, 6 + len(runs), cache_prompt=False)["tokens"] for p in prompts]
            client.close()
        assert [r["tokens_evaluated"] for r in replies] == [len(p) for p in prompts]
        assert [r["tokens"] for r in replies] == lone
        runs.append([r["tokens"][:6] for r in replies])
    assert runs[0] == runs[1] and len({tuple(r) for r in runs[0]}) > 1


def test_quality_of_a_quantised_file_is_measured_against_the_reference(tmp_path):
    folder = tiny_folder(tmp_path, "llama")
    tokenizer = build_tiny_tokenizer()
    text = [tokenizer("Summarise the meeting notes: ship on Friday, 価格は据え置き。")["input_ids"]]
    measured = {}
    for export_type in ("f32", "q8_0", "q4_0"):
        path = export_gguf(folder, tmp_path / f"{export_type}.gguf", export_type, name="tiny").path
        with serve(path, threads=1, ctx=512) as server:
            client = LlamaCppClient(server)
            measured[export_type] = teacher_forced(client, text, 40)
            client.close()
    same = sparse_kl_top1(measured["f32"], measured["f32"])
    assert same["kl_vs_reference"] == pytest.approx(0.0, abs=1e-9) and same["top1_vs_reference"] == 1.0
    q8, q4 = sparse_kl_top1(measured["f32"], measured["q8_0"]), sparse_kl_top1(measured["f32"], measured["q4_0"])
    assert q8["kl_positions"] >= 20
    assert 0 < q8["kl_vs_reference"] < q4["kl_vs_reference"]


def test_sparse_kl_and_top1_on_hand_built_distributions():
    from edgedistill.export.verify import Distributions

    row = lambda ids, probs: (np.array(ids), np.log(np.array(probs, dtype=np.float64)))
    reference = Distributions([row([5, 7, 9], [0.5, 0.3, 0.1]), row([3, 4], [0.6, 0.3]), None, row([1], [0.9])])
    quant = Distributions([row([7, 5, 2], [0.4, 0.4, 0.1]), row([3, 8], [0.7, 0.1]), row([1], [0.5]), None])
    got = sparse_kl_top1(reference, quant, k=2)
    # Position 1, k = 2: reference (0.5, 0.3 | tail 0.2), quant on ids 5, 7: (0.4, 0.4 | tail 0.2); argmax 5 vs 7.
    kl_1 = 0.5 * np.log(0.5 / 0.4) + 0.3 * np.log(0.3 / 0.4) + 0.2 * np.log(0.2 / 0.2)  # 0.11157 - 0.08630 = 0.02527
    # Position 2: id 4 is not in the quant's list, so it gets the quant's smallest listed
    # probability, 0.1: quant (0.7, 0.1 | tail 0.2) against reference (0.6, 0.3 | tail 0.1); argmax 3 = 3.
    kl_2 = 0.6 * np.log(0.6 / 0.7) + 0.3 * np.log(0.3 / 0.1) + 0.1 * np.log(0.1 / 0.2)  # -0.09249 + 0.32958 - 0.06931
    # Positions 3 and 4: one side listed nothing, skipped.
    assert got == pytest.approx({"kl_vs_reference": (kl_1 + kl_2) / 2, "top1_vs_reference": 0.5, "kl_positions": 2,
                                 "kl_positions_skipped": 2, "kl_ids_outside_quant_list": 1}, rel=1e-12)
    assert (kl_1, kl_2) == pytest.approx((0.02527, 0.16778), abs=1e-5)  # the arithmetic above


def test_bad_inputs_fail_in_one_line_and_leave_nothing(tmp_path):
    import json

    folder = tiny_folder(tmp_path, "llama")
    unknown = tmp_path / "unknown"
    shutil.copytree(folder, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(config | {"architectures": ["FooForCausalLM"]}))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"architecture 'FooForCausalLM' cannot be written as GGUF by llama.cpp's "):
        export_gguf(unknown, out / "x.gguf", "f16", name="x")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(UserError, match="no .safetensors weights to export"):  # the converter would write 9 KB
        export_gguf(no_weights, out / "w.gguf", "f16", name="w")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="llama.cpp's converter refused this model"):
        export_gguf(folder, out / "y.gguf", "q8_0", name="y")
    assert not out.exists() or list(out.iterdir()) == []  # no half-written file, no temp file
    with pytest.raises(UserError, match="not one of"):
        export_gguf(folder, out / "z.gguf", "q3_xl", name="z")


def test_cli_export_before_training_is_one_line_exit_2(tmp_path, tiny_teacher_dir):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\nname = "x"\nruns_dir = "{tmp_path / "runs"}"\n[teacher]\nmodel = "{tiny_teacher_dir}"\n'
                      '[student]\nkeep_layers = 2\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "edgedistill", "export", str(recipe)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")][0].endswith(
        "runs/x: no such run yet — start it with `edgedistill run RECIPE` (stage 'export' needs the stages before it)")
    assert not (tmp_path / "runs").exists()


SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_modelfile_translates_chatml_and_stops_at_end_of_turn():
    text = modelfile("demo-q8_0.gguf", SMOLLM2_TEMPLATE, ["<|im_end|>"])
    assert "FROM ./demo-q8_0.gguf" in text and '<|im_start|>{{ .Role }}' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1
    llama3 = modelfile("m.gguf", "{{ '<|start_header_id|>' }}", ["<|eot_id|>", "<|end_of_text|>"])
    assert "<|start_header_id|>assistant<|end_header_id|>" in llama3 and 'PARAMETER stop "<|end_of_text|>"' in llama3
    other = modelfile("m.gguf", "[INST] {{ messages }}", ["</s>"])
    assert "TEMPLATE" not in other.replace("# The chat template", "") and 'PARAMETER stop "</s>"' in other


def test_published_files_are_readable_by_other_local_users(tmp_path):
    """mkstemp makes 0600 files: Ollama's service account could not read the GGUF."""
    import os
    import stat

    folder = tiny_folder(tmp_path, "llama")
    old = os.umask(0o022)
    try:
        path = export_gguf(folder, tmp_path / "out" / "tiny-q8_0.gguf", "q8_0", name="tiny").path
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_every_gguf_type_the_recipe_accepts_has_a_quantisation():
    from edgedistill.export.quantize import EXPORT_TYPES
    from edgedistill.recipe import GGUF_TYPES

    assert list(EXPORT_TYPES) and set(EXPORT_TYPES) == set(GGUF_TYPES)
