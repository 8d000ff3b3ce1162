"""`edgedistill serve --policy FILE`: a system prompt and a short usage policy for the server.

The file is TOML with two text fields, both optional but not both empty:

    system_prompt = "You are the help desk assistant of ACME. Decline requests for personal data."
    policy = '''
    Use this assistant for questions about ACME products only.
    Do not enter customers' personal data. Answers can be wrong: check before acting on them.
    '''

The server sends `system_prompt` as the first message of every chat request that has no system
message of its own, serves both at `GET /policy` (JSON; behind the API key like the API when
the server has one), and the chat page shows the policy above the conversation. TOML because
recipes are TOML too, and multi-line strings need no escaping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomllib

from edgedistill.errors import UserError

FIELDS = ("system_prompt", "policy")


@dataclass(frozen=True)
class Policy:
    system_prompt: str
    policy: str

    def as_json(self) -> dict[str, str]:
        return {"system_prompt": self.system_prompt, "policy": self.policy}


def load_policy(path: str | Path) -> Policy:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--policy {file}: file not found")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--policy {file}: not valid UTF-8 TOML ({exc})") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UserError(f"--policy {file}: unknown field '{unknown[0]}' — the file has {' and '.join(FIELDS)}")
    bad = [name for name in FIELDS if not isinstance(data.get(name, ""), str)]
    if bad:
        raise UserError(f"--policy {file}: {bad[0]} must be text (a TOML string)")
    policy = Policy(data.get("system_prompt", "").strip(), data.get("policy", "").strip())
    if not policy.system_prompt and not policy.policy:
        raise UserError(f"--policy {file}: empty — give system_prompt, policy or both")
    return policy


def with_system_prompt(body: dict, policy: Policy | None) -> dict:
    """The chat request with the policy's system prompt first, unless it brings its own."""
    messages = body.get("messages")
    if policy is None or not policy.system_prompt or not isinstance(messages, list):
        return body
    if any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
        return body
    return body | {"messages": [{"role": "system", "content": policy.system_prompt}, *messages]}
