"""Turn prompt/response rows into tokenized causal-LM training examples.

One example is three aligned lists of length T ≤ ``max_length``::

    input_ids      = [BOS?] prompt_ids                 response_ids  END
    labels         = -100 … -100 (prompt, masked)      response_ids  END
    attention_mask = 1 … 1

The prompt text is exactly :func:`format_prompt` (the chat template with
``add_generation_prompt=True`` when the tokenizer has one, else ``DataSpec.template``).  Prompt and
response are tokenized *separately* and concatenated, so the boundary between them is exact and the
prompt ids are the ones :func:`encode_prompt` gives at inference time.  The model's loss shifts
labels by one position (token t predicts t+1), so masking the prompt with -100 puts the loss on
the response and its END alone ("train on responses only", the usual choice for instruction tuning).

END is how the turn is closed (:mod:`.turns`).  With a chat template, the response tokens are
exactly what the template writes after the prompt, end-of-turn marker included (ChatML:
``46<|im_end|>\n``), as TRL supervises them; without one, END is the EOS token.

Truncation keeps the first ``max_length`` tokens.  A row is *truncated* when some response token or
its END is cut, and *dropped* when no response token survives (its prompt alone fills max_length).

Packing (``DataSpec.packing``) places whole training examples one after another into rows of at most
``max_length`` tokens, with ``position_ids`` that restart at 0 for every example and no attention
mask, so that each example attends only to itself at its own positions (:mod:`.packing`): every
token's loss is the one it has alone.  The eval split is never packed.
"""

from __future__ import annotations

import html
import numbers
import random
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...errors import DataError
from ...specs import DataSpec
from .packing import pack_examples, pad_packed
from .sources import load_columns
from .turns import close_responses, template_response, uses_chat_template

__all__ = ["PreparedData", "prepare_dataset", "format_prompt", "encode_prompt", "pad_batch", "padded_length",
           "prompts_responses", "split_columns", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss(ignore_index=-100): these positions add no loss
COLUMN_HINTS = (("instruction", "output"), ("question", "answer"), ("input", "output"),
                ("prompt", "completion"), ("query", "response"), ("text", "label"))


@dataclass(frozen=True)
class PreparedData:
    """Tokenized train (and eval) examples, and what preparation did to the rows.

    ``train``/``eval`` are ``datasets.Dataset`` with columns ``input_ids``, ``attention_mask`` and
    ``labels`` (lists of ints); ``eval`` is None without an eval split.  With ``packing`` the train
    rows have ``position_ids`` instead of ``attention_mask`` (see :mod:`.packing`); eval rows are
    never packed.  ``n_rows`` counts the rows read from the source (both splits), ``n_truncated``
    the rows cut to ``max_length`` but kept, ``n_dropped`` the rows removed because their response
    was cut away entirely.
    ``n_train_tokens`` is the number of tokens in ``train`` (no padding) and ``n_label_tokens`` how
    many of them carry a label (are not -100).
    """

    train: Any
    eval: Any | None
    n_rows: int
    n_truncated: int
    n_dropped: int
    max_length: int
    n_train_tokens: int
    n_label_tokens: int = 0
    packing: bool = False

    def _summary(self) -> list[tuple[str, str]]:
        ev = "none" if self.eval is None else f"{len(self.eval):,} sequences"
        return [("train", f"{len(self.train):,} sequences"), ("eval", ev),
                ("rows read", f"{self.n_rows:,}"), ("truncated", f"{self.n_truncated:,}"),
                ("dropped", f"{self.n_dropped:,}"), ("max_length", f"{self.max_length:,}"),
                ("train tokens", f"{self.n_train_tokens:,}"),
                ("supervised tokens", f"{self.n_label_tokens:,}"),
                ("packing", "on" if self.packing else "off")]

    def __repr__(self) -> str:
        return "PreparedData(" + ", ".join(f"{k}: {v}" for k, v in self._summary()) + ")"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td style='text-align:right'>{html.escape(v)}</td></tr>"
                       for k, v in self._summary())
        return f"<table><caption>PreparedData</caption>{rows}</table>"


# -------------------------------------------------------------------------------------- rendering

def _check_messages(messages, where: str) -> list[dict]:
    ok = isinstance(messages, (list, tuple)) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise DataError(f"{where} is not a list of {{'role': str, 'content': str}} messages: "
                        f"{messages!r:.200}", "give each message a string role and content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _plain_text(messages: list[dict]) -> str:
    """Chat messages as plain text for the non-chat template: one user turn is its content."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _check_messages(prompt, "The prompt")


def format_prompt(tokenizer, prompt, spec: DataSpec = DataSpec()) -> str:
    """The exact text that precedes the response in training (use it for generation too).

    ``prompt`` is a string (one user turn) or a list of ``{"role", "content"}`` messages.  With a
    chat template (and ``spec.use_chat_template``) it is
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``, else
    ``spec.template.format(prompt=text)``.  Tokenize it with :func:`encode_prompt`, which adds the
    BOS exactly as training does.
    """
    messages = _as_messages(prompt)
    if uses_chat_template(tokenizer, spec):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as e:  # noqa: BLE001 - jinja errors from the template itself
            raise DataError(f"The tokenizer's chat template failed on {messages!r:.200}: {e}",
                            "fix the messages, or pass DataSpec(use_chat_template=False)") from e
    text = prompt if isinstance(prompt, str) else _plain_text(messages)
    try:
        return spec.template.format(prompt=text)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"DataSpec.template = {spec.template!r} cannot be filled: {e!r}.",
                        "use only {prompt} as a field; write literal braces as {{ and }}") from e


def _bos_prefix(tokenizer) -> list[int]:
    """[bos_token_id] when the tokenizer adds a BOS on its own (Llama does), else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def _with_bos(ids: list[int], bos: list[int]) -> list[int]:
    return list(ids) if not bos or ids[:1] == bos else bos + list(ids)  # a template may hold <s>


def encode_prompt(tokenizer, prompt, spec: DataSpec = DataSpec()) -> list[int]:
    """The prompt's token ids exactly as training sees them (BOS added the same way)."""
    ids = tokenizer(format_prompt(tokenizer, prompt, spec), add_special_tokens=False)["input_ids"]
    return _with_bos(ids, _bos_prefix(tokenizer))


# ------------------------------------------------------------------------------------ preparation

def _missing_column(cols: dict, spec: DataSpec) -> DataError:
    have = list(cols)
    fix = ("pass DataSpec(prompt_column=..., response_column=...) naming your columns, or "
           "DataSpec(messages_column=...) for chat rows")
    for p, r in COLUMN_HINTS:
        if p in cols and r in cols:
            fix = f"pass DataSpec(prompt_column={p!r}, response_column={r!r})"
    has_p, has_r = spec.prompt_column in cols, spec.response_column in cols
    if has_p != has_r:
        field, name = (("response_column", spec.response_column) if has_p
                       else ("prompt_column", spec.prompt_column))
        problem = f"The data has no column {name!r} (DataSpec.{field}); its columns are {have}."
        fix = f"pass DataSpec({field}=...) with one of {have}"
    else:
        problem = (f"The data has neither the columns {spec.prompt_column!r} and "
                   f"{spec.response_column!r} (DataSpec.prompt_column, DataSpec.response_column) "
                   f"nor {spec.messages_column!r} (DataSpec.messages_column); its columns are "
                   f"{have}.")
    return DataError(problem, fix)


def prompts_responses(cols: dict, spec: DataSpec, split: str) -> tuple[list, list[str]]:
    """Per row: the prompt (a string or prompt messages) and the response string."""
    if spec.prompt_column in cols and spec.response_column in cols:
        prompts, responses = cols[spec.prompt_column], cols[spec.response_column]
        for col, values in ((spec.prompt_column, prompts), (spec.response_column, responses)):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                v = values[bad]
                raise DataError(f"Row {bad} of the {split} data has {col!r} = {v!r:.80}, "
                                f"a {type(v).__name__}, not a string.",
                                f"make every value of column {col!r} a string (e.g. str(x)), or "
                                "drop the rows that lack it")
        return list(prompts), list(responses)
    if spec.messages_column not in cols:
        raise _missing_column(cols, spec)
    prompts, responses = [], []
    for i, msgs in enumerate(cols[spec.messages_column]):
        msgs = _check_messages(msgs, f"Row {i} of the {split} data ({spec.messages_column!r})")
        last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if not last:  # None (no assistant turn) or 0 (nothing before it)
            raise DataError(f"Row {i} of the {split} data has no assistant message after a prompt "
                            f"(roles: {[m['role'] for m in msgs]}).",
                            "end each conversation with {'role': 'assistant', 'content': ...}")
        prompts.append(msgs[:last])
        responses.append(msgs[last]["content"])
    return prompts, responses


_ENC = dict(add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)


def _response_ids(tokenizer, prompts: list, responses: list[str], texts: list[str],
                  spec: DataSpec) -> list[list[int]]:
    """Each response's supervised ids, closed as the turn is (:mod:`.turns`): with a chat template,
    the tokens of what the template writes after the prompt text; else the response and EOS."""
    if not uses_chat_template(tokenizer, spec):
        ids = tokenizer(responses, **_ENC)["input_ids"]
        return [list(r) + [tokenizer.eos_token_id] for r in ids]
    written = [template_response(tokenizer, _as_messages(p), r, t)
               for p, r, t in zip(prompts, responses, texts)]
    ids = tokenizer(written, **_ENC)["input_ids"]
    return close_responses(tokenizer, ids, written, responses)


def _examples(cols: dict, tokenizer, spec: DataSpec, split: str):
    """Tokenized examples of one split, plus (n_truncated, n_dropped, longest prompt)."""
    prompts, responses = prompts_responses(cols, spec, split)
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("The tokenizer has no eos_token, so responses cannot be ended.",
                        "set tokenizer.eos_token (e.g. to its end-of-turn token)")
    texts = [format_prompt(tokenizer, p, spec) for p in prompts]
    p_ids = tokenizer(texts, **_ENC)["input_ids"]
    r_ids = _response_ids(tokenizer, prompts, responses, texts, spec)
    bos, L = _bos_prefix(tokenizer), spec.max_length
    examples, n_cut, n_drop, longest = [], 0, 0, 0
    for p, r in zip(p_ids, r_ids):
        p = _with_bos(p, bos)
        longest = max(longest, len(p))
        if len(p) >= L:
            n_drop += 1
            continue
        n_cut += len(p) + len(r) > L
        prompt_labels = [IGNORE_INDEX] * len(p) if spec.train_on_responses_only else p
        examples.append({"input_ids": (p + r)[:L], "labels": (prompt_labels + r)[:L]})
    return examples, n_cut, n_drop, longest


def _to_dataset(examples: list[dict]):
    """Unpacked examples get an all-ones ``attention_mask``; packed rows keep their
    ``position_ids`` and get no mask (see :mod:`.packing`)."""
    from datasets import Dataset

    cols = {"input_ids": [e["input_ids"] for e in examples]}
    if examples and "position_ids" in examples[0]:
        cols["position_ids"] = [e["position_ids"] for e in examples]
    else:
        cols["attention_mask"] = [[1] * len(e["input_ids"]) for e in examples]
    cols["labels"] = [e["labels"] for e in examples]
    return Dataset.from_dict(cols)


def split_columns(cols: dict, fraction: float, seed: int) -> tuple[dict, dict | None]:
    """Hold out round(n·fraction) rows (at least 1, never all), chosen by ``seed``."""
    n = len(next(iter(cols.values())))
    if fraction <= 0 or n < 2:
        return cols, None
    n_eval = min(n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])

    def pick(held_out: bool) -> dict:
        return {k: [v[i] for i in range(n) if (i in held) == held_out] for k, v in cols.items()}

    return pick(False), pick(True)


def prepare_dataset(source, tokenizer, spec: DataSpec = DataSpec()) -> PreparedData:
    """Tokenize ``source`` into train (and eval) examples for causal-LM fine-tuning.

    ``source``: a ``datasets.Dataset`` or ``DatasetDict`` (its 'train' split, and its 'validation'
    or 'test' split as eval), a list of dicts, a pandas DataFrame, a local ``.json``/``.jsonl``/
    ``.csv``/``.tsv`` file, a folder written by ``save_to_disk``, or a hub dataset name (read by
    ``datasets.load_dataset``; to pick a config or split, call it yourself and pass the result).

    Rows have ``spec.prompt_column`` and ``spec.response_column`` strings, or a
    ``spec.messages_column`` list of ``{"role", "content"}`` messages whose last assistant message
    is the response and the messages before it the prompt.  See the module docstring for the
    example layout, truncation and packing (of the train rows only).  Eval is None when
    ``spec.eval_fraction == 0``; else it is the source's own eval split if it has one, or
    ``eval_fraction`` of the rows chosen by ``spec.seed``.
    """
    if not isinstance(spec, DataSpec):
        raise DataError(f"spec must be a DataSpec, not {type(spec).__name__}.",
                        "pass spec=lora_lab.DataSpec(...)")
    train_cols, eval_cols = load_columns(source)
    n_train = len(next(iter(train_cols.values()), []))
    n_eval = len(next(iter(eval_cols.values()), [])) if eval_cols else 0
    if n_train == 0:
        raise DataError("The dataset is empty: it has no rows to train on.",
                        "pass a source with at least one {'prompt': ..., 'response': ...} row")
    if spec.eval_fraction == 0:
        eval_cols, n_eval = None, 0
    elif eval_cols is None:
        train_cols, eval_cols = split_columns(train_cols, spec.eval_fraction, spec.seed)
    splits, counts, train_examples = {}, [0, 0], []
    for name, cols in (("train", train_cols), ("eval", eval_cols)):
        if cols is None or not len(next(iter(cols.values()), [])):
            continue
        examples, n_cut, n_drop, longest = _examples(cols, tokenizer, spec, name)
        counts[0] += n_cut
        counts[1] += n_drop
        if not examples:
            raise DataError(f"Every row of the {name} data was truncated away: no response token "
                            f"fits in DataSpec.max_length = {spec.max_length} (the longest prompt "
                            f"is {longest} tokens).",
                            f"raise DataSpec.max_length above {longest}, or shorten the prompts")
        pack = spec.packing and name == "train"  # eval stays one example per row
        splits[name] = _to_dataset(pack_examples(examples, spec.max_length) if pack else examples)
        if name == "train":
            train_examples = examples  # token counts are the same packed or not
    return PreparedData(
        train=splits["train"], eval=splits.get("eval"), n_rows=n_train + n_eval,
        n_truncated=counts[0], n_dropped=counts[1], max_length=spec.max_length,
        n_train_tokens=sum(len(e["input_ids"]) for e in train_examples),
        n_label_tokens=sum(len(e["labels"]) - e["labels"].count(IGNORE_INDEX)
                           for e in train_examples),
        packing=spec.packing)


def pad_batch(rows: list[dict], pad_token_id: int, *, multiple_of: int | None = None,
              max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch: the collate function for training.

    Returns LongTensors of shape (B, T), T = the longest row: ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` with -100 (no loss on padding).
    A row without ``attention_mask`` gets ones; a row without ``labels`` gets its ``input_ids``.

    ``multiple_of`` rounds T up to a multiple (as transformers' collators' ``pad_to_multiple_of``),
    but never past ``max_length`` (the model's positions) when T itself fits.  The extra columns
    are padding like the rest: with right padding and a causal mask no real token attends to them
    and they carry no loss, so the loss and gradients do not change.  What changes is the number
    of distinct shapes a run sees (``TrainSpec.pad_to_multiple_of``).

    Packed rows (rows with ``position_ids``, from ``DataSpec(packing=True)``) give ``input_ids``,
    ``labels`` and ``position_ids`` and no ``attention_mask``: call the model with
    ``use_cache=False`` (as ``train`` does) and every example attends only to itself
    (:func:`lora_lab.hf.data.packing.pad_packed`).
    """
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise DataError(f"pad_batch got pad_token_id = {pad_token_id!r}, not a token id.",
                        "pass tokenizer.pad_token_id (if None, set tokenizer.pad_token = "
                        "tokenizer.eos_token first)")
    if not rows:
        raise DataError("pad_batch got no rows.", "pass a non-empty list of examples")
    whole = isinstance(multiple_of, numbers.Integral) and not isinstance(multiple_of, bool)
    if multiple_of is not None and not (whole and multiple_of >= 1):
        raise DataError(f"pad_batch got multiple_of = {multiple_of!r}, not a positive integer.",
                        "pass multiple_of=None (no rounding) or a small power of two such as 8")
    longest = max(len(r["input_ids"]) for r in rows)
    T = padded_length(longest, multiple_of, max_length)
    if any("position_ids" in r for r in rows):
        return pad_packed(rows, pad_token_id, length=T)
    ids = [torch.as_tensor(r["input_ids"], dtype=torch.long).flatten() for r in rows]
    B = len(ids)
    out = {"input_ids": torch.full((B, T), int(pad_token_id), dtype=torch.long),
           "attention_mask": torch.zeros((B, T), dtype=torch.long),
           "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long)}
    for i, (row, x) in enumerate(zip(rows, ids)):
        n = len(x)
        out["input_ids"][i, :n] = x
        out["attention_mask"][i, :n] = torch.as_tensor(row.get("attention_mask", 1)).flatten()
        out["labels"][i, :n] = torch.as_tensor(row.get("labels", x)).flatten()
    return out


def padded_length(longest: int, multiple_of: int | None, max_length: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``multiple_of``; past ``max_length`` only when
    ``longest`` already is.  ``padded_length(37, 8) == 40``, ``padded_length(37, 8, 38) == 38``."""
    if not multiple_of or multiple_of == 1:
        return longest
    T = -(-longest // multiple_of) * multiple_of
    return max(longest, min(T, max_length)) if max_length else T
