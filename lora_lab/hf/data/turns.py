"""Where an assistant turn ends: what the chat template writes after the response.

A chat template closes every assistant turn with its own *end-of-turn* marker, which need not be the
tokenizer's ``eos_token``::

    builtin:tiny   <s>Q: 12+34\\nA: 46</s>                           end of turn = </s>  = eos
    ChatML         <|im_start|>assistant\\n46<|im_end|>\\n            end of turn = <|im_end|>
    Llama 3        <|start_header_id|>assistant<|end_header_id|>\\n\\n46<|eot_id|>

SmolLM2-Instruct's eos *is* ``<|im_end|>``, but a base model given a ChatML template (Qwen2.5 base:
eos ``<|endoftext|>``) is not: closing its responses with eos teaches it a turn ending that the
template never writes, and generation that stops on eos alone runs past ``<|im_end|>`` into a made-up
next turn.

So, with a chat template, the supervised response is exactly what the template writes after the
prompt (the generation prompt), as TRL's prompt-completion and assistant-only losses do::

    full     = apply_chat_template(messages + [assistant: response])
    prompt   = apply_chat_template(messages, add_generation_prompt=True)
    response = full[len(prompt):]          # "46<|im_end|>\\n": content, end of turn, and what follows

and generation stops on the template's end-of-turn token as well as on eos
(:func:`end_of_turn_ids`).  Without a chat template (``DataSpec.template``) the response is closed
with eos, as before; so is a templated response after which the template writes no special token at
all (nothing would ever end it).
"""

from __future__ import annotations

from ...errors import DataError
from ...specs import DataSpec

__all__ = ["uses_chat_template", "special_ids", "template_response", "close_responses",
           "end_of_turn_ids"]

_PROBE = [{"role": "user", "content": "Hi"}]
_PROBE_REPLY = "Hello"


def uses_chat_template(tokenizer, spec: DataSpec) -> bool:
    """True when prompts are rendered by the tokenizer's chat template (it has one and ``spec``
    does not switch it off)."""
    return bool(spec.use_chat_template and getattr(tokenizer, "chat_template", None))


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: bos/eos/pad/unk and every added token marked special
    (``all_special_ids`` alone misses ChatML's ``<|im_start|>`` on some tokenizers)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def template_response(tokenizer, messages: list[dict], response: str, prompt_text: str) -> str:
    """The text the chat template writes for the assistant turn ``response`` after the prompt
    ``prompt_text`` (= ``apply_chat_template(messages, add_generation_prompt=True)``).

    Raises a ``DataError`` when the template does not write the prompt as a prefix of the whole
    conversation: then no token boundary separates prompt from response.
    """
    turn = list(messages) + [{"role": "assistant", "content": response}]
    try:
        full = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja errors from the template itself
        raise DataError(f"The tokenizer's chat template failed on {turn!r:.200}: {e}",
                        "fix the messages, or pass DataSpec(use_chat_template=False)") from e
    if not full.startswith(prompt_text):
        raise DataError(
            f"The chat template writes the prompt differently when the answer follows: the prompt "
            f"{prompt_text[-80:]!r} (its end) is not the start of the conversation "
            f"{full[:len(prompt_text) + 40][-120:]!r}, so the response cannot be cut from it.",
            "use a chat template whose add_generation_prompt output is a prefix of the rendered "
            "conversation, or pass DataSpec(use_chat_template=False)")
    return full[len(prompt_text):]


def _after_content(text: str, content: str) -> str:
    """The part of ``text`` after the last occurrence of ``content`` (all of it when absent)."""
    content = content.strip()
    at = text.rfind(content) if content else -1
    return text[at + len(content):] if at >= 0 else text


def close_responses(tokenizer, ids: list[list[int]], texts: list[str],
                    contents: list[str]) -> list[list[int]]:
    """Each ``ids[k]`` (the tokens of the template's response ``texts[k]``), plus eos when the
    template writes no special token after the content ``contents[k]``; else unchanged (the
    template ends the turn itself)."""
    tails = [_after_content(t, c) for t, c in zip(texts, contents)]
    tail_ids = tokenizer(tails, add_special_tokens=False)["input_ids"] if tails else []
    specials = special_ids(tokenizer)
    return [list(i) if any(t in specials for t in tail) else list(i) + [tokenizer.eos_token_id]
            for i, tail in zip(ids, tail_ids)]


def end_of_turn_ids(tokenizer, spec: DataSpec = DataSpec()) -> list[int]:
    """The token ids that end an assistant turn: the template's end-of-turn token, then eos.

    The end-of-turn token is the first special token the chat template writes after an answer
    (probed with a one-line exchange): ``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, eos
    for ``builtin:tiny``.  Without a chat template, or when the template writes none (or fails on
    the probe), the answer ends with eos alone: ``[eos_token_id]``.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    if uses_chat_template(tokenizer, spec):
        try:
            prompt = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
            text = _after_content(template_response(tokenizer, _PROBE, _PROBE_REPLY, prompt),
                                  _PROBE_REPLY)
        except DataError:
            text = ""
        specials = special_ids(tokenizer)
        first = next((i for i in tokenizer(text, add_special_tokens=False)["input_ids"]
                      if i in specials), None) if text else None
        if first is not None:
            ids.append(int(first))
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return ids
