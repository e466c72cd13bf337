"""Tiny tokenizers of four chat-template families, built locally (nothing is downloaded), each with
its template written once with `{% generation %}` markers and once without (the stock form).

The templates follow the real ones closely (Qwen 2.5's with tools, Llama 3's, Mistral v0.1's with no
system role, Gemma 3's with `model` as the assistant role and the system prompt folded into the first
user turn). The marked form wraps each assistant turn's content and end-of-turn token; stripping the
markers gives the stock form, so transformers' `return_assistant_tokens_mask` of the marked template
is the oracle for masks found from the stock one. Two templates render earlier turns differently
once later turns follow: Qwen3-style (the reasoning of assistant turns before the last user turn is
dropped) and Mistral-v0.3-style (the system prompt rides on the last user turn).
"""
from __future__ import annotations

from pathlib import Path

from tests.support.data import LLAMA3_SPLIT_PATTERN, sample_conversations

G, EG = "{% generation %}", "{% endgeneration %}"

QWEN_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}" + G +
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>' }}" + EG + "{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen 2.5's template (tools in the system turn, <tool_call> JSON, <tool_response> in a user turn)."""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% if message['role'] == 'assistant' %}" + G + "{{ message['content'] | trim + '<|eot_id|>' }}" + EG +
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
"""Llama 3's template."""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}" + G + "{{ message['content'] + eos_token }}" + EG +
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
"""Mistral 7B Instruct v0.1's template: [INST] turns, no system role."""

GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if role == 'model' -%}" + G + "{{ message['content'] | trim }}{{ '<end_of_turn>' }}" + EG +
    "{{ '\\n' }}{%- else -%}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma 3's (text) template: `model` turns, the system prompt folded into the first user turn."""

QWEN3_REASONING = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}" + G +
    "{%- if message.reasoning_content and loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>' }}" + EG + "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen3-style: the reasoning of assistant turns before the last user turn is not rendered."""

MISTRAL_SYSTEM_LAST = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}{%- for m in loop_messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.index0 == ns.last_user and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' }}" + G + "{{- message['content'] + eos_token }}" + EG +
    "{%- endif %}{%- endfor %}"
)
"""Mistral-v0.3-style: the system prompt is rendered in the last user turn."""

NO_ASSISTANT = ("{%- for message in messages %}{%- if message.role != 'assistant' %}"
                "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
                "{%- endif %}{%- endfor %}")
"""A template with no assistant role: assistant turns are not rendered at all."""

FAMILIES = {
    # family: (marked template, special tokens, added non-special tokens, bos, eos, has a system role)
    "chatml": (QWEN_TOOLS, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"],
               None, "<|im_end|>", True),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], [], "<|begin_of_text|>", "<|eot_id|>", True),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], [], "<s>", "</s>", False),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], [], "<bos>", "<eos>", True),
    "qwen3": (QWEN3_REASONING, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"],
              None, "<|im_end|>", True),
    "mistral_v3": (MISTRAL_SYSTEM_LAST, ["<s>", "</s>", "[INST]", "[/INST]"], [], "<s>", "</s>", True),
}


def unmarked(template: str) -> str:
    """The stock form of a marked template."""
    return template.replace(G, "").replace(EG, "")


def build_family_tokenizer(out_dir: Path, family: str, *, marked: bool = False, template: str | None = None,
                           vocab_size: int = 400):
    """A tiny byte-level BPE tokenizer of `family` (its special tokens, BOS/EOS), saved to out_dir with
    the family's template, marked or stock (or `template`). Returns the fast tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tmpl, special, added, bos, eos, _ = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for r in sample_conversations(150, seed=1) for m in r["messages"]]
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.chat_template = template if template is not None else (tmpl if marked else unmarked(tmpl))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir), save_jinja_files=False)
    return fast


def family_conversations(family: str, n: int, seed: int = 0) -> list[dict]:
    """Multi-turn records for `family`: with system prompts where it has a system role."""
    has_system = FAMILIES[family][5]
    recs = sample_conversations(n, seed=seed, max_words=8)
    for i, r in enumerate(recs):
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        if has_system and i % 3 != 2:
            msgs = [{"role": "system", "content": f"system prompt {i}: be brief"}, *msgs]
        r["messages"] = msgs
    return recs


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.support.chat_templates FAMILY DIR`: DIR/tokenizer (tiny, FAMILY's stock template)
    and DIR/sharegpt.jsonl (200 ShareGPT conversations), for trying `prepare mode=chat` on a stock template."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in FAMILIES:
        sys.exit(f"usage: python -m tests.support.chat_templates {{{','.join(FAMILIES)}}} DIR")
    out = Path(args[1])
    build_family_tokenizer(out / "tokenizer", args[0])
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    lines = [json.dumps({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]})
             for r in family_conversations(args[0], 200)]
    (out / "sharegpt.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/tokenizer ({args[0]} stock template) and {out}/sharegpt.jsonl")


if __name__ == "__main__":
    main()
