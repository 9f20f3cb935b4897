"""A client on another node: run inside a network namespace by tests/deploy/test_multinode.py.

The test process lives in the host's namespace, which has no route to the lab's addresses, so
the requests are made from here (``ip netns exec <ns> python multinode_client.py ...``) and the
findings come back as one JSON line on stdout.

  completions API MODEL WORDS SALT  a non-streamed completion and a streamed chat (openai), then
                                    a raw streamed completion; SALT starts the prompt, so no
                                    engine's prefix cache holds it from an earlier call
  get URL                              GET a URL, print its status and body
  post URL JSON                        POST JSON, print its status and body
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any


def completions(api: str, model: str, prompt_words: int, salt: str) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    prompt = " ".join([salt] + [words[i % len(words)] for i in range(prompt_words)])
    done = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    extra = done.model_extra or {}
    chunks = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    raw = _post(
        f"{api}/completions",
        {"model": model, "prompt": prompt, "max_tokens": 4, "stream": True},
    )
    return {
        "text": done.choices[0].text,
        "completion_tokens": done.usage.completion_tokens if done.usage else None,
        "kv_transfer_params": extra.get("kv_transfer_params"),
        "chat_stream_text": streamed,
        "raw_stream_status": raw["status"],
        "raw_stream_done_lines": raw["body"].count("data: [DONE]"),
    }


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return _open(request)


def _open(request: urllib.request.Request | str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as error:
        return {"status": error.code, "body": error.read().decode()}
    except OSError as error:
        return {"status": 0, "body": f"{type(error).__name__}: {error}"}


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "completions":
        result = completions(args[0], args[1], int(args[2]), args[3])
    elif command == "get":
        result = _open(args[0])
    elif command == "post":
        result = _post(args[0], json.loads(args[1]))
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
