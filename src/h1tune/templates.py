"""The chat formats of the Falcon-H1 family, as Jinja chat templates for the offline preset tokenizers.

    build_tokenizer(chat_format="h1r")        # h1tune.presets: a tokenizer carrying this template

Every format path (masks, tool calls, reasoning) is tested offline through these, so each mirrors
what its family publishes, as far as we could read it (README "Reasoning models" says what was
confirmed):

- `h1`: Falcon-H1-Instruct, ChatML with the BOS token first; tools listed in the system turn, each
  call one JSON object in <tool_call> tags, results in a `tool` turn.
- `h1tiny`: Falcon-H1-Tiny's tool layout (from Falcon-H1-Tiny-Multilingual-100M-Instruct's
  chat_template.jinja): a `<|system|>` header with the tools, the turn's calls as one JSON *list*
  (the messages' `tool_calls` as given) inside <tool_call>, after the assistant turn or alone when
  the turn has no text; tool results as an assistant turn wrapped in <tool_response>; plain ChatML
  without tools.
- `h1r`: a reasoning template: `reasoning_content` rendered as <think>…</think> before the answer,
  for the assistant turns after the last user message only (earlier traces are left out, as
  reasoning templates commonly do, so h1tune's masks must follow what is rendered).
"""

from __future__ import annotations

H1 = (
    "{{- bos_token -}}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif %}"
    "{{- 'You may call one or more functions. Function signatures are listed in <tools></tools>:\\n<tools>\\n' -}}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\\n' -}}{%- endfor %}"
    "{{- '</tools>\\nTo call a function, reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\\n' -}}"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message['content'] %}{{- message['content'] -}}{%- endif %}"
    "{%- if message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' -}}{%- endif %}"
    "{{- '<tool_call>\\n' + ({'name': fn['name'], 'arguments': fn['arguments']} | tojson) + '\\n</tool_call>' -}}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' -}}{%- endif %}"
)

_TINY_TOOLS_PROMPT = (
    "You are a Falcon assistant skilled in function calling. You are helpful, respectful, and concise.\\n\\n"
    "# Tools\\n\\nYou have access to the following functions. You MUST use them to answer questions when "
    "needed. For each function call, you MUST return a JSON object inside <tool_call></tool_call> tags.\\n\\n"
    "<tools>"
)
_TINY_TOOLS_FORMAT = (
    "</tools>\\n\\n# Output Format\\n\\nYour response MUST follow this format when making function calls:\\n"
    "<tool_call>\\n[\\n{\"name\": \"function_name\", \"arguments\": {\"arg1\": \"value1\"}}\\n]\\n</tool_call>\\n"
    "If no function calls are needed, respond normally without the tool_call tags."
)
H1TINY = (
    "{%- if tools %}"
    "{{- bos_token + '<|system|>\\n' -}}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n' -}}"
    "{%- set remaining = messages[1:] %}{%- else %}{%- set remaining = messages %}{%- endif %}"
    "{{- '" + _TINY_TOOLS_PROMPT + "' + (tools | tojson) + '" + _TINY_TOOLS_FORMAT + "' -}}"
    "{%- for message in remaining %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '\\n<|im_start|>user\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] %}{{- '\\n<|im_start|>assistant\\n' + message['content'] + '\\n<|im_end|>' -}}{%- endif %}"
    "{%- if message['tool_calls'] %}"
    "{{- '\\n<tool_call>\\n' + (message['tool_calls'] | tojson(indent=2)) + '\\n</tool_call>' -}}"
    "{%- endif %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '\\n<|im_start|>assistant\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>' -}}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif %}"
    "{%- else %}"
    "{{- bos_token -}}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' -}}{%- endif %}"
    "{%- endif %}"
)

H1R = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message['reasoning_content'] is defined and message['reasoning_content'] "
    "and loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' -}}"
    "{%- endif %}"
    "{{- (message['content'] or '') + '<|im_end|>\\n' -}}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' -}}{%- endif %}"
)

CHAT_FORMATS = {"h1": H1, "h1tiny": H1TINY, "h1r": H1R}
