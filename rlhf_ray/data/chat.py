"""One rendering of prompts and (prompt, response) pairs, for every place that needs it.

A prompt is plain text or a chat: a list of ``{"role", "content"}`` messages (TRL's conversational
format). A response is plain text, or for a chat the assistant's turn (a string, or the messages
that complete the conversation).

* **Rollout engines** get :meth:`ChatRenderer.prompt_ids`: a chat rendered by the chat template with
  the generation prompt (``apply_chat_template(..., add_generation_prompt=True, tokenize=False)``),
  then tokenized without adding special tokens again; plain text tokenized as it is (BOS added by
  the tokenizer, when it adds one).
* **The reward model** (training, the Serve service and PPO scoring alike) gets
  :meth:`ChatRenderer.pair_ids`: a chat with the response as the assistant's turn rendered by the
  template (trailing whitespace after the last turn dropped), a plain pair as
  :func:`rm_text` joins it; then tokenized, with BOS only where the text does not hold it already
  and EOS appended only where the text does not end in it. So a template that writes ``bos_token``
  itself or ends each turn with the EOS token (ChatML's ``<|im_end|>``) gets neither twice.

``data.chat_template`` picks the template: ``auto`` (the tokenizer's own, used for chat records),
``none`` (no template: chat records are refused) or a Jinja file (:func:`resolve_chat_template` reads
it; the text is what travels to the actors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

Message = dict[str, Any]  # {"role": str, "content": str, ...}
Prompt = Union[str, list[Message]]
Completion = Union[str, list[Message]]

AUTO, NONE = "auto", "none"
_PROBE = "\x00rlhf-ray-probe\x00"


def is_chat(x: Any) -> bool:
    """A chat (a list of messages), as opposed to plain text."""
    return isinstance(x, list)


def check_messages(x: Any, field: str) -> list[Message]:
    """``x`` as a list of messages, or ValueError naming ``field`` (``prompt[1].content``, ...)."""
    if not isinstance(x, list) or not x:
        raise ValueError(f"field {field!r} must be a string or a non-empty list of messages")
    for i, m in enumerate(x):
        if not isinstance(m, dict):
            raise ValueError(f"{field}[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"{field}[{i}].{key} must be a string, got {type(m.get(key)).__name__}")
    return x


def resolve_chat_template(setting: str, field: str = "data.chat_template") -> str:
    """``auto``, ``none``, or the text of the Jinja file ``setting`` names (a ConfigError, which is a
    ValueError, naming ``field`` when it cannot be read)."""
    from rlhf_ray.config import ConfigError

    if setting in (AUTO, NONE):
        return setting
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}: {setting!r} is neither 'auto', 'none' nor a Jinja file")
    text = path.read_text()
    if "{{" not in text and "{%" not in text:
        raise ConfigError(f"{field}: {path} holds no Jinja template (no '{{{{' or '{{%')")
    return text


def rm_text(prompt: str, response: str) -> str:
    """A plain (prompt, response) pair as the RM reads it: the prompt, one space unless the prompt is
    empty or ends in whitespace, and the response without surrounding whitespace."""
    sep = "" if not prompt or prompt[-1].isspace() else " "
    return f"{prompt}{sep}{response.strip()}"


class ChatRenderer:
    """Prompts and pairs to text and token ids for one tokenizer (see the module docstring).

    ``chat_template``: ``auto`` (the tokenizer's), ``none``, or Jinja source (from
    :func:`resolve_chat_template`). :meth:`apply_to` stores a Jinja template in the tokenizer, so
    that the model directory saved with it renders the same way.
    """

    def __init__(self, tokenizer, chat_template: str = AUTO):
        self.tokenizer = tokenizer
        self.setting = chat_template
        if chat_template == AUTO:
            self.template = getattr(tokenizer, "chat_template", None) or None
        elif chat_template == NONE:
            self.template = None
        else:
            self.template = chat_template
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.bos_text = tokenizer.bos_token if self.bos is not None else None

    def apply_to(self, tokenizer=None) -> None:
        """Store the Jinja template in ``tokenizer`` (default: this renderer's), for saving."""
        if self.setting not in (AUTO, NONE):
            (tokenizer or self.tokenizer).chat_template = self.template

    def _template(self) -> str:
        if self.template is None:
            why = ("data.chat_template=none" if self.setting == NONE else
                   f"the tokenizer ({type(self.tokenizer).__name__}) has no chat template")
            raise ValueError(f"a chat record needs a chat template, but {why}; set data.chat_template to a "
                             f"Jinja file (or 'auto' with a chat model)")
        return self.template

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self._template(), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    # ---- prompts (the rollout engines' input)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids the engine continues from."""
        if is_chat(prompt):
            return list(self.tokenizer(self._render(prompt, True), add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def completion(self, prompt: Prompt, text: str) -> Completion:
        """A generated response in TRL's form: the text for a plain prompt, ``[{"role": "assistant",
        "content": text}]`` for a chat."""
        return [{"role": "assistant", "content": text}] if is_chat(prompt) else text

    # ---- pairs (the reward model's input)

    def pair_text(self, prompt: Prompt, response: Completion) -> str:
        if is_chat(prompt):
            turn = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
            return self._render(list(prompt) + turn, False).rstrip()
        if not isinstance(response, str):
            raise ValueError("a plain-text prompt takes a plain-text response, not messages")
        return rm_text(prompt, response)

    def texts_ids(self, texts: list[str]) -> list[list[int]]:
        """Rendered texts as RM token ids: BOS unless a text starts with it, EOS unless it ends in it."""
        holds = [self.bos_text is not None and t.startswith(self.bos_text) for t in texts]
        out: list[list[int]] = [[] for _ in texts]
        for flag in (False, True):  # one tokenizer call per kind
            idx = [i for i, h in enumerate(holds) if h == flag]
            if idx:
                encoded = self.tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
                for i, ids in zip(idx, encoded):
                    out[i] = list(ids)
        for ids in out:
            if not ids or ids[-1] != self.eos:
                ids.append(self.eos)
        return out

    def text_ids(self, text: str) -> list[int]:
        return self.texts_ids([text])[0]

    def pairs_ids(self, prompts: list[Prompt], responses: list[Completion]) -> list[list[int]]:
        """:meth:`pair_ids` of aligned lists (one tokenizer call)."""
        return self.texts_ids([self.pair_text(p, r) for p, r in zip(prompts, responses)])

    def pair_ids(self, prompt: Prompt, response: Completion) -> list[int]:
        return self.text_ids(self.pair_text(prompt, response))

    # ---- stop tokens

    def stop_token_ids(self) -> list[int]:
        """The token that ends an assistant turn in the template (ChatML's ``<|im_end|>``), when it is a
        special token; [] without a template or when the template does not render a probe."""
        if self.template is None:
            return []
        try:
            text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], False)
        except Exception:  # a template with rules the probe breaks (roles, alternation): no extra stops
            return []
        if _PROBE not in text:
            return []
        after = text.split(_PROBE, 1)[1]
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        special = set(getattr(self.tokenizer, "all_special_ids", [])) | set(
            getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
        return [ids[0]] if ids and ids[0] in special else []
