"""`edgedistill serve --policy FILE`, through a real server on 127.0.0.1 (the embedded GGUF in
llama.cpp) and the official openai client: the policy at /policy behind the key, the system
prompt put before chat requests that bring none, the chat page that shows the policy."""

from __future__ import annotations

import httpx
import pytest
from conftest import ServeProcess

from edgedistill.errors import UserError
from edgedistill.serve.policy import Policy, load_policy, with_system_prompt

SYSTEM = "You are the ACME help desk. Answer in one short sentence."
POLICY = "Use this assistant for ACME products only.\nDo not enter customers' personal data."
KEY = "sk-policy-test"


def test_policy_served_behind_the_key_and_its_system_prompt_used(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'system_prompt = "{SYSTEM}"\npolicy = """\n{POLICY}\n"""\n', encoding="utf-8")
    server = ServeProcess("embedded", "--policy", str(path), "--api-key-env", "EDGE_POLICY_KEY",
                          env={"EDGE_POLICY_KEY": KEY})
    try:
        assert httpx.get(server.base + "/policy").status_code == 401
        got = httpx.get(server.base + "/policy", headers={"Authorization": f"Bearer {KEY}"})
        assert got.status_code == 200 and got.json() == {"system_prompt": SYSTEM, "policy": POLICY}
        page = httpx.get(server.base + "/").text
        assert 'id="policy"' in page and 'fetch("/policy"' in page
        client = server.client(KEY)
        question = {"role": "user", "content": "What is the capital of France?"}
        ask = dict(model="SmolLM2-135M-Instruct-Q4_1", max_tokens=12, temperature=0, seed=1)
        implicit = client.chat.completions.create(messages=[question], **ask)
        explicit = client.chat.completions.create(messages=[{"role": "system", "content": SYSTEM}, question], **ask)
        own = client.chat.completions.create(messages=[{"role": "system", "content": "Reply in French."}, question],
                                             **ask)
        # Same prompt as when the client sends the policy's system prompt itself; its own system
        # message is left alone (a different prompt length).
        assert implicit.usage.prompt_tokens == explicit.usage.prompt_tokens != own.usage.prompt_tokens
        assert implicit.choices[0].message.content == explicit.choices[0].message.content
    finally:
        server.stop()


def test_no_policy_is_a_404(tmp_path):
    server = ServeProcess("embedded")
    try:
        answer = httpx.get(server.base + "/policy")
        assert answer.status_code == 404 and "--policy FILE" in answer.json()["error"]["message"]
    finally:
        server.stop()


@pytest.mark.parametrize("text, message", [
    ("policy = 3\n", "policy must be text"),
    ("system_prompt = 'x'\nrules = 'y'\n", "unknown field 'rules'"),
    ("system_prompt = ''\n", "empty"),
    ("policy = \"unterminated\n", "not valid UTF-8 TOML"),
])
def test_bad_policy_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_policy(path)
    with pytest.raises(UserError, match="file not found"):
        load_policy(tmp_path / "missing.toml")


def test_system_prompt_only_where_none_is_given():
    policy = Policy("Be brief.", "")
    user = [{"role": "user", "content": "hi"}]
    assert with_system_prompt({"messages": user}, policy)["messages"][0] == {"role": "system", "content": "Be brief."}
    for own in ("system", "developer"):
        body = {"messages": [{"role": own, "content": "mine"}] + user}
        assert with_system_prompt(body, policy) == body
    assert with_system_prompt({"messages": user}, Policy("", "Only a policy.")) == {"messages": user}
