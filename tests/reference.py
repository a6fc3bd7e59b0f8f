"""Plain reference implementations the batched code under test is checked against."""

from __future__ import annotations

import torch

from rlhf_ray.data.preferences import encode_texts, rm_text


@torch.no_grad()
def rm_rewards(model, tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[float]:
    """R(x_i, y_i) one pair at a time (no batching, no padding, no reordering)."""
    out = []
    for p, r in zip(prompts, responses):
        ids, mask, _ = encode_texts(tokenizer, [rm_text(p, r)], max_length)
        out.append(float(model(input_ids=ids, attention_mask=mask).logits[0, 0]))
    return out


# A chat template for the embedded tokenizer (which has none) that writes BOS itself and ends every turn
# with EOS, as many real templates do (Llama-2's writes BOS, ChatML ends turns with its EOS <|im_end|>).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")

# CHAT_TEMPLATE with tools, Hermes-style: the tools' names in a system turn, an assistant turn's calls as
# <tool_call>{json}</tool_call>, tool messages as turns of their own (prefix-preserving, as TRL needs).
TOOL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}system : tools{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "{{ eos_token }}\n{% endif %}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
