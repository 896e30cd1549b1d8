"""Drive the server with mistralai 0.4.2, as the Prompt Engineering Guide uses it; print JSON.

Run in a subprocess with the 0.4.2 install first on PYTHONPATH (it cannot share an environment
with the current SDK): `python mistral042_chat.py URL KEY MODEL`. The last stdout line is a JSON
object that tests/server/test_mistral_clients.py asserts on.
"""

import json
import sys

import mistralai
from mistralai.client import MistralClient
from mistralai.exceptions import MistralAPIException
from mistralai.models.chat_completion import ChatMessage

url, key, model = sys.argv[1:4]
client = MistralClient(api_key=key, endpoint=url, max_retries=0, timeout=60)
# Few-shot classification, the guide's pattern: system, then user/assistant examples, then user.
messages = [
    ChatMessage(role="system", content="You are a sentiment classifier. Answer positive or negative."),
    ChatMessage(role="user", content="I love this movie!"),
    ChatMessage(role="assistant", content="positive"),
    ChatMessage(role="user", content="This was a waste of time."),
]
reply = client.chat(model=model, messages=messages, safe_mode=True, temperature=0, max_tokens=12)
unsafe = client.chat(model=model, messages=messages, temperature=0, max_tokens=1)
chunks = list(
    client.chat_stream(model=model, messages=messages, safe_mode=True, temperature=0, max_tokens=12)
)
try:
    client.chat(model="no-such-model", messages=messages, max_tokens=1)
    unknown_model_status = None
except MistralAPIException as exc:
    unknown_model_status = exc.http_status

choice = reply.choices[0]
print(
    json.dumps(
        {
            "sdk_file": mistralai.__file__,
            "id": reply.id,
            "object": reply.object,
            "model": reply.model,
            "role": choice.message.role,
            "content": choice.message.content,
            "content_type": type(choice.message.content).__name__,
            "finish_reason": choice.finish_reason.value if choice.finish_reason else None,
            "prompt_tokens": reply.usage.prompt_tokens,
            "completion_tokens": reply.usage.completion_tokens,
            "prompt_tokens_without_safe_mode": unsafe.usage.prompt_tokens,
            "first_delta_role": chunks[0].choices[0].delta.role,
            "streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
            "stream_finish_reasons": [
                c.choices[0].finish_reason.value for c in chunks if c.choices and c.choices[0].finish_reason
            ],
            "stream_usage": chunks[-1].usage.completion_tokens if chunks[-1].usage else None,
            "models": [m.id for m in client.list_models().data],
            "unknown_model_status": unknown_model_status,
        }
    )
)
