"""Run with mistralai 0.4.2 first on PYTHONPATH: `python mistral042_chat.py URL KEY MODEL`.

Drives the server the way the Prompt Engineering Guide uses the old client and prints JSON.
"""

import json
import sys

from mistralai.client import MistralClient
from mistralai.models.chat_completion import ChatMessage

url, key, model = sys.argv[1:4]
client = MistralClient(api_key=key, endpoint=url)
messages = [
    ChatMessage(role="system", content="You are a sentiment classifier. Answer positive or negative."),
    ChatMessage(role="user", content="I love this movie!"),
    ChatMessage(role="assistant", content="positive"),
    ChatMessage(role="user", content="This was a waste of time."),
]
reply = client.chat(model=model, messages=messages, safe_mode=True, temperature=0, max_tokens=12)
streamed = "".join(
    chunk.choices[0].delta.content or ""
    for chunk in client.chat_stream(
        model=model, messages=messages, safe_mode=True, temperature=0, max_tokens=12
    )
)
print(
    json.dumps(
        {
            "content": reply.choices[0].message.content,
            "content_type": type(reply.choices[0].message.content).__name__,
            "finish_reason": str(
                reply.choices[0].finish_reason.value if reply.choices[0].finish_reason else None
            ),
            "prompt_tokens": reply.usage.prompt_tokens,
            "streamed": streamed,
            "models": [m.id for m in client.list_models().data],
            "version": __import__("mistralai").__file__,
        }
    )
)
